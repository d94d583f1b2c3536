//! `tapback`: the xenstore backend daemon for blktap3 `vbd3` devices. See `tapback::daemon`.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    std::process::exit(blktap3::tapback::daemon::main_with_args(&args));
}
