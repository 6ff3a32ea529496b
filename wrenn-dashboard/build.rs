//! The console's files are embedded at compile time: rebuild when `dashboard/dist`
//! changes, or appears (its parent directory changes then).
fn main() {
    let dist = std::path::Path::new("../dashboard/dist");
    if dist.exists() {
        println!("cargo:rerun-if-changed=../dashboard/dist");
    } else {
        println!("cargo:rerun-if-changed=../dashboard");
    }
}
