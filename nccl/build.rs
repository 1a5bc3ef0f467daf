//! The shared library's SONAME is NCCL's (`libnccl.so.2`): a program linked against it, or
//! against NVIDIA's NCCL, loads whichever `libnccl.so.2` the loader finds first.
fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libnccl.so.2");
}
