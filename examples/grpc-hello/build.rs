fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/greeter.proto");
    tonic_prost_build::configure()
        .build_client(false)
        .compile_protos(&["proto/greeter.proto"], &["proto"])
        .map_err(|e| {
            format!("cannot compile proto/greeter.proto (is protoc installed? apt-get install protobuf-compiler): {e}").into()
        })
}
