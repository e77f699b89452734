fn main() {
    println!("demo: not built yet");
}
