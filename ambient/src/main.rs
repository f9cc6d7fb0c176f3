fn main() {
    eprintln!("ambient: not built yet");
    std::process::exit(2);
}
