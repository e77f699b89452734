fn main() -> std::io::Result<()> {
    println!("cargo:rerun-if-changed=conduit");
    // Records are plain prost messages; the stream service gets a tonic client and server.
    tonic_build::configure()
        .build_client(true)
        .build_server(true)
        // Frames are passed through, not parsed: decode them without copying.
        .bytes([".conduit.v1.Frame"])
        // Bounded decoding: a wire scan refuses oversized batches before prost allocates.
        .codec_path("crate::codec::BoundedCodec")
        .compile_protos(
            &["conduit/v1/records.proto", "conduit/v1/stream.proto"],
            &["."],
        )
}
