fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "ringbolt/v1/jobs.proto",
        "ringbolt/internal/v1/cluster.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure().compile_protos(&protos, &["."])?;
    Ok(())
}
