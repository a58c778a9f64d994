//! Generates the admin gRPC service (proto/hyperbox/admin/v1/admin.proto).
fn main() {
    println!("cargo:rerun-if-changed=proto");
    tonic_build::configure()
        .compile(&["proto/hyperbox/admin/v1/admin.proto"], &["proto"])
        .expect("compile the admin proto (needs protoc: apt install protobuf-compiler)");
}
