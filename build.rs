//! Give the cdylib (target/*/libblktap3.so) the soname of the C library it replaces, so that
//! installing it as /usr/lib/libblktapctl.so.0 makes it a drop-in for libxl.
fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libblktapctl.so.0");
    println!("cargo:rerun-if-changed=build.rs");
}
