//! Known-answer tests: IEEE 1619-2007 XTS-AES vectors (general 128-bit tweak and, where
//! the sequence number fits in 32 bits, the blktap "plain" sector wrapper) and the
//! OpenXT encrypted-VHD vectors A, B, C (openxt-reference §1.11).

use blktap3::image::crypto::{compute_hash, parse_hex, parse_hex_vec, to_hex, KeyHash, XtsCipher};
use sha2::{Digest, Sha256};

fn h(s: &str) -> Vec<u8> {
    parse_hex_vec(s).unwrap()
}

fn sha(d: &[u8]) -> String {
    to_hex(&Sha256::digest(d))
}

fn tweak(seq: u128) -> [u8; 16] {
    seq.to_le_bytes()
}

/// 0, 1, ..., 255, 0, 1, ..., 255
fn counting512() -> Vec<u8> {
    (0..512).map(|i| i as u8).collect()
}

const K4_128: &str = "2718281828459045235360287471352631415926535897932384626433832795";
const K10_256: &str = "27182818284590452353602874713526624977572470936999595749669676273141592653589793238462643383279502884197169399375105820974944592";

const V4_CT: &str = "27a7479befa1d476489f308cd4cfa6e2a96e4bbe3208ff25287dd3819616e89cc78cf7f5e543445f8333d8fa7f56000005279fa5d8b5e4ad40e736ddb4d35412328063fd2aab53e5ea1e0a9f332500a5df9487d07a5c92cc512c8866c7e860ce93fdf166a24912b422976146ae20ce846bb7dc9ba94a767aaef20c0d61ad02655ea92dc4c4e41a8952c651d33174be51a10c421110e6d81588ede82103a252d8a750e8768defffed9122810aaeb99f9172af82b604dc4b8e51bcb08235a6f4341332e4ca60482a4ba1a03b3e65008fc5da76b70bf1690db4eae29c5f1badd03c5ccf2a55d705ddcd86d449511ceb7ec30bf12b1fa35b913f9f747a8afd1b130e94bff94effd01a91735ca1726acd0b197c4e5b03393697e126826fb6bbde8ecc1e08298516e2c9ed03ff3c1b7860f6de76d4cecd94c8119855ef5297ca67e9f3e7ff72b1e99785ca0a7e7720c5b36dc6d72cac9574c8cbbc2f801e23e56fd344b07f22154beba0f08ce8891e643ed995c94d9a69c9f1b5f499027a78572aeebd74d20cc39881c213ee770b1010e4bea718846977ae119f7a023ab58cca0ad752afe656bb3c17256a9f6e9bf19fdd5a38fc82bbe872c5539edb609ef4f79c203ebb140f2e583cb2ad15b4aa5b655016a8449277dbd477ef2c8d6c017db738b18deb4a427d1923ce3ff262735779a418f20a282df920147beabe421ee5319d0568";

const V10_CT: &str = "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b5d31e276f8fe4a8d66b317f9ac683f44680a86ac35adfc3345befecb4bb188fd5776926c49a3095eb108fd1098baec70aaa66999a72a82f27d848b21d4a741b0c5cd4d5fff9dac89aeba122961d03a757123e9870f8acf1000020887891429ca2a3e7a7d7df7b10355165c8b9a6d0a7de8b062c4500dc4cd120c0f7418dae3d0b5781c34803fa75421c790dfe1de1834f280d7667b327f6c8cd7557e12ac3a0f93ec05c52e0493ef31a12d3d9260f79a289d6a379bc70c50841473d1a8cc81ec583e9645e07b8d9670655ba5bbcfecc6dc3966380ad8fecb17b6ba02469a020a84e18e8f84252070c13e9f1f289be54fbc481457778f616015e1327a02b140f1505eb309326d68378f8374595c849d84f4c333ec4423885143cb47bd71c5edae9be69a2ffeceb1bec9de244fbe15992b11b77c040f12bd8f6a975a44a0f90c29a9abc3d4d893927284c58754cce294529f8614dcd2aba991925fedc4ae74ffac6e333b93eb4aff0479da9a410e4450e0dd7ae4c6e2910900575da401fc07059f645e8b7e9bfdef33943054ff84011493c27b3429eaedb4ed5376441a77ed43851ad77f16f541dfd269d50d6a5f14fb0aab1cbb4c1550be97f7ab4066193c4caa773dad38014bd2092fa755c824bb5e54c4f36ffda9fcea70b9c6e693e148c151";

/// Encrypt with the general primitive, check, decrypt back.
fn check_general(key: &str, seq: u128, pt: &[u8], ct: &[u8]) {
    let c = XtsCipher::new(&h(key)).unwrap();
    let mut d = pt.to_vec();
    c.encrypt_unit(&tweak(seq), &mut d);
    assert_eq!(to_hex(&d), to_hex(ct), "encrypt seq {seq:#x}");
    c.decrypt_unit(&tweak(seq), &mut d);
    assert_eq!(d, pt, "decrypt seq {seq:#x}");
}

#[test]
fn ieee1619_vectors_1_to_3_32_byte_units() {
    // Vector 1: zero keys, zero tweak.
    check_general(
        &"00".repeat(32),
        0,
        &[0u8; 32],
        &h("917cf69ebd68b2ec9b9fe9a3eadda692cd43d2f59598ed858c02c2652fbf922e"),
    );
    // Vector 2.
    check_general(
        &("11".repeat(16) + &"22".repeat(16)),
        0x3333333333,
        &[0x44u8; 32],
        &h("c454185e6a16936e39334038acef838bfb186fff7480adc4289382ecd6d394f0"),
    );
    // Vector 3.
    check_general(
        &("fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0".to_string() + &"22".repeat(16)),
        0x3333333333,
        &[0x44u8; 32],
        &h("af85336b597afc1a900b2eb21ec949d292df4c047e0b21532186a5971a227a89"),
    );
}

#[test]
fn ieee1619_vectors_4_5_6_aes128_512_byte_units() {
    let pt = counting512();
    check_general(K4_128, 0, &pt, &h(V4_CT));
    // Vector 5: plaintext = vector 4's ciphertext, data unit 1.
    let c = XtsCipher::new(&h(K4_128)).unwrap();
    let mut d = h(V4_CT);
    c.encrypt_unit(&tweak(1), &mut d);
    assert_eq!(
        to_hex(&d[..32]),
        "264d3ca8512194fec312c8c9891f279fefdd608d0c027b60483a3fa811d65ee5"
    );
    assert_eq!(
        sha(&d),
        "bed1b9d9bf8ce83a2ae1981fbd5f2b0c40e21bba5d57df2ea16ecd0975f25215"
    );
    // Vector 6: vector 5's ciphertext, data unit 2.
    c.encrypt_unit(&tweak(2), &mut d);
    assert_eq!(
        sha(&d),
        "68f1e84faa401c9914a7fd6fc565eaa7b531cedbc22bd28269aa58b15ceec03f"
    );

    // The same three as 512-byte sectors through the plain wrapper (LBA 0, 1, 2).
    let mut s = pt.clone();
    c.encrypt_sectors(0, &mut s);
    assert_eq!(to_hex(&s), V4_CT);
    c.encrypt_sectors(1, &mut s);
    c.encrypt_sectors(2, &mut s);
    assert_eq!(
        sha(&s),
        "68f1e84faa401c9914a7fd6fc565eaa7b531cedbc22bd28269aa58b15ceec03f"
    );
    c.decrypt_sectors(2, &mut s);
    c.decrypt_sectors(1, &mut s);
    c.decrypt_sectors(0, &mut s);
    assert_eq!(s, pt);
}

#[test]
fn ieee1619_vectors_10_to_14_aes256() {
    let pt = counting512();
    let c = XtsCipher::new(&h(K10_256)).unwrap();
    check_general(K10_256, 0xff, &pt, &h(V10_CT));
    let digests: [(u128, &str, Option<&str>); 5] = [
        (
            0xff,
            "e97e974fa393af794f7a4684395814cf820de60a01eaec677d87b452e316b364",
            Some("1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b"),
        ),
        (
            0xffff,
            "def4fad29e95dfe1a24b1ad4620f86d7be094cced5b19e0b121aa82d9e6baf98",
            Some("77a31251618a15e6b92d1d66dffe7b50b50bad552305ba0217a610688eff7e11"),
        ),
        (
            0xffffff,
            "8bf44861a081dd660d91ce615b5cdfb4d5df9d72c3025c12e67cc0ae097fa5d5",
            None,
        ),
        (
            0xffffffff,
            "c706140a11affda7402234f5e6331eacbfeb687d8e80d83962691823bb3636f0",
            None,
        ),
        (
            0xffffffffff,
            "afba71abc4e95b186d89a63a5437c1bafcfd1a18ca273970c534aba4f8d05282",
            None,
        ),
    ];
    for (seq, digest, prefix) in digests {
        let mut d = pt.clone();
        c.encrypt_unit(&tweak(seq), &mut d);
        assert_eq!(sha(&d), digest, "vector with data unit {seq:#x}");
        if let Some(p) = prefix {
            assert_eq!(to_hex(&d[..32]), p);
        }
        let general = d.clone();
        c.decrypt_unit(&tweak(seq), &mut d);
        assert_eq!(d, pt);
        // Sequence numbers that fit in 32 bits are also "plain" sectors; vectors 10-13
        // through the sector wrapper, including at LBA + 2^32 (same 32-bit tweak).
        if seq <= 0xffff_ffff {
            for lba in [seq as u64, seq as u64 + (1u64 << 32)] {
                let mut s = pt.clone();
                c.encrypt_sectors(lba, &mut s);
                assert_eq!(s, general, "plain sector lba {lba:#x}");
            }
        } else {
            // Vector 14 needs the full 40-bit tweak: the plain wrapper truncates.
            let mut s = pt.clone();
            c.encrypt_sectors(seq as u64, &mut s);
            assert_ne!(s, general);
        }
    }
}

fn key64() -> Vec<u8> {
    (0u8..64).collect()
}

fn key32() -> Vec<u8> {
    (0u8..32).collect()
}

fn sector(c: &XtsCipher, lba: u64) -> [u8; 512] {
    let mut s = [0u8; 512];
    c.encrypt_sectors(lba, &mut s);
    s
}

#[test]
fn openxt_vector_a_aes256() {
    let c = XtsCipher::new(&key64()).unwrap();
    assert_eq!(c.key_bits(), 512);
    let s0 = sector(&c, 0);
    assert_eq!(
        to_hex(&s0[..32]),
        "cd6b103236fbd87dba93e9001e29bc3d5e885d6abd1577e3e0e0a5f49e444894"
    );
    assert_eq!(to_hex(&s0[496..]), "226790136af4ae079c61a907ba497df2");
    assert_eq!(
        sha(&s0),
        "9943ddf45f593dcb9bcd2e3043ea706a3a7f0d35bfca0ddcfa7c0803e588601a"
    );
    let s1 = sector(&c, 1);
    assert_eq!(
        to_hex(&s1[..32]),
        "0c22ed7e2168a8500b30154c2ec00d26f8f158f9af844bffaf0387b64c761a1e"
    );
    assert_eq!(to_hex(&s1[496..]), "a1fe130460ec6322bc846036dc6cc47b");
    assert_eq!(
        sha(&s1),
        "310f8d962bab7e66a56806621e3d02be60b6387a70ecde08685b09925b37512d"
    );
    // Sector 2^32 reuses sector 0's tweak ("plain" truncation).
    assert_eq!(sector(&c, 1u64 << 32), s0);
    assert_eq!(sector(&c, (1u64 << 32) + 1), s1);
    // A two-sector request starting at 2^32 - 1 wraps inside the request.
    let mut two = [0u8; 1024];
    c.encrypt_sectors((1u64 << 32) - 1, &mut two);
    assert_eq!(&two[512..], &s0[..]);
    c.decrypt_sectors((1u64 << 32) - 1, &mut two);
    assert_eq!(two, [0u8; 1024]);
}

#[test]
fn openxt_vector_b_aes128() {
    let c = XtsCipher::new(&key32()).unwrap();
    assert_eq!(c.key_bits(), 256);
    let mut both = [0u8; 1024];
    c.encrypt_sectors(0, &mut both);
    let (s0, s1) = both.split_at(512);
    assert_eq!(
        to_hex(&s0[..32]),
        "f071a2b402c105ea37024133e24d6ef6212e8cc0175e1b6b32657d54f159daf6"
    );
    assert_eq!(to_hex(&s0[496..]), "048e03178663b4fec9d9bb05835c52f7");
    assert_eq!(
        sha(s0),
        "a27916ef0ecf96010e1fcc453238d4a06d3d9b24abaf14a4fe41f8d18528b06f"
    );
    assert_eq!(
        to_hex(&s1[..32]),
        "a8ce33a288a211258599d867beceaf25af22ac0c12e00c7d57fe1dcd3273c74b"
    );
    assert_eq!(to_hex(&s1[496..]), "eabbee88416c7eda35ebe03d41aec5e9");
    assert_eq!(
        sha(s1),
        "25ed8dd42c77a1d8383bbc71c5b39525dabc1e0111ce6ec545b089e087a1664b"
    );
    c.decrypt_sectors(0, &mut both);
    assert_eq!(both, [0u8; 1024]);
}

#[test]
fn openxt_vector_c_key_hashes() {
    let zero = [0u8; 32];
    let n: [u8; 32] = parse_hex(
        &(0x40u8..0x60)
            .map(|b| format!("{b:02x}"))
            .collect::<String>(),
    )
    .unwrap();
    let cases: [(Vec<u8>, [u8; 32], &str); 4] = [
        (
            key64(),
            zero,
            "dc7a48014fc1fac8b52af39bc7ea5cafafabf8bb81fb8f880fdf3b4a4566795c",
        ),
        (
            key64(),
            n,
            "719d5171dfedaddfb9c79d66ef5e789b0b2219fbd68bbb1d0f09a901cdfcce09",
        ),
        (
            key32(),
            zero,
            "bb2275c49f28ad52cae6d55e34a974a58c7a3ba26f976e8ecbbe7a536918dc73",
        ),
        (
            key32(),
            n,
            "7fcae223fa8aa951b003ef172fb37bd1a758a42cc3b7f6c528461da6f26aae7c",
        ),
    ];
    for (key, nonce, hash) in cases {
        assert_eq!(to_hex(&compute_hash(&nonce, &key)), hash);
        let kh = KeyHash::for_key(&key, &nonce);
        assert_eq!(kh.cookie, 1);
        assert!(kh.matches(&key));
        assert_eq!(kh.print_form(), format!("{} {}", to_hex(&nonce), hash));
        // The 65-byte record as stored at batmap header offset 29.
        let rec = kh.to_bytes();
        assert_eq!(rec[0], 1);
        assert_eq!(&rec[1..33], &nonce);
        assert_eq!(to_hex(&rec[33..]), hash);
        assert_eq!(KeyHash::from_bytes(&rec), kh);
    }
}
