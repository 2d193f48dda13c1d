fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["ringbolt/v1/jobs.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure().compile_protos(&protos, &["."])?;
    Ok(())
}
