fn main() -> std::io::Result<()> {
    println!("cargo:rerun-if-changed=conduit");
    prost_build::Config::new().compile_protos(&["conduit/v1/records.proto"], &["."])
}
