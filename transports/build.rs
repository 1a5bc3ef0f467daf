//! Generates the libfabric bindings when the `libfabric` feature is on, and the ibverbs
//! bindings when the `ibverbs` feature is on; nothing otherwise.
//!
//! Both libraries' data-path calls (`fi_tsend`, `fi_cq_read`, `ibv_post_send`,
//! `ibv_poll_cq`, ...) are `static inline` functions in their headers. bindgen's
//! `wrap_static_fns` writes a C file that turns each into an exported function; it is compiled
//! here with `cc` and linked into the crate.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "libfabric")]
    libfabric::generate();
    #[cfg(feature = "ibverbs")]
    ibverbs::generate();
}

#[cfg(feature = "ibverbs")]
mod ibverbs {
    use std::path::PathBuf;

    pub fn generate() {
        let lib = pkg_config::Config::new().probe("libibverbs").unwrap_or_else(|e| {
            panic!(
                "the `ibverbs` feature needs rdma-core's libibverbs with its headers, found through pkg-config \
                 (Debian/Ubuntu: apt-get install libibverbs-dev): {e}"
            )
        });
        let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
        let wrapper = out.join("verbs_wrapper.h");
        std::fs::write(&wrapper, "#include <infiniband/verbs.h>\n").expect("write the wrapper header");
        let statics = out.join("verbs_static_fns");
        let mut b = bindgen::Builder::default()
            .header(wrapper.to_string_lossy())
            .allowlist_function("ibv_.*")
            .allowlist_type("ibv_.*")
            .allowlist_var("IBV_.*")
            // Enums as plain integer constants (flags are or-ed together).
            .default_enum_style(bindgen::EnumVariation::Consts)
            .prepend_enum_name(false)
            .wrap_static_fns(true)
            .wrap_static_fns_path(&statics)
            .derive_default(true)
            .layout_tests(false)
            .generate_comments(false)
            .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()));
        for p in &lib.include_paths {
            b = b.clang_arg(format!("-I{}", p.display()));
        }
        let bindings = b.generate().expect("bindgen over libibverbs' headers");
        bindings.write_to_file(out.join("verbs_sys.rs")).expect("write the bindings");
        let mut c = cc::Build::new();
        c.file(statics.with_extension("c")).include(&out).warnings(false);
        for p in &lib.include_paths {
            c.include(p);
        }
        c.compile("oxccl_verbs_static");
        for p in &lib.link_paths {
            println!("cargo:rustc-link-search=native={}", p.display());
        }
        for l in &lib.libs {
            println!("cargo:rustc-link-lib={l}");
        }
    }
}

#[cfg(feature = "libfabric")]
mod libfabric {
    use std::path::PathBuf;

    const HEADERS: &[&str] = &[
        "rdma/fabric.h",
        "rdma/fi_domain.h",
        "rdma/fi_endpoint.h",
        "rdma/fi_tagged.h",
        "rdma/fi_cm.h",
        "rdma/fi_eq.h",
        "rdma/fi_rma.h",
        "rdma/fi_errno.h",
    ];

    pub fn generate() {
        let lib = pkg_config::Config::new().atleast_version("1.17").probe("libfabric").unwrap_or_else(|e| {
            panic!(
                "the `libfabric` feature needs libfabric >= 1.17 with its headers, found through pkg-config \
                 (Debian/Ubuntu: apt-get install libfabric-dev): {e}"
            )
        });
        let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
        let wrapper = out.join("fabric_wrapper.h");
        let mut text = String::new();
        for h in HEADERS {
            text += &format!("#include <{h}>\n");
        }
        std::fs::write(&wrapper, text).expect("write the wrapper header");
        let statics = out.join("fabric_static_fns");
        let mut b = bindgen::Builder::default()
            .header(wrapper.to_string_lossy())
            .allowlist_function("fi_.*")
            .allowlist_type("fi_.*|fid_.*|fid")
            .allowlist_var("FI_.*")
            .wrap_static_fns(true)
            .wrap_static_fns_path(&statics)
            .derive_default(true)
            .layout_tests(false)
            .generate_comments(false)
            .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()));
        for p in &lib.include_paths {
            b = b.clang_arg(format!("-I{}", p.display()));
        }
        let bindings = b.generate().expect("bindgen over libfabric's headers");
        bindings.write_to_file(out.join("fabric_sys.rs")).expect("write the bindings");
        let mut c = cc::Build::new();
        c.file(statics.with_extension("c")).include(&out).warnings(false);
        for p in &lib.include_paths {
            c.include(p);
        }
        // The generated C file includes the wrapper header by its absolute path.
        c.compile("oxccl_fabric_static");
        for p in &lib.link_paths {
            println!("cargo:rustc-link-search=native={}", p.display());
        }
        for l in &lib.libs {
            println!("cargo:rustc-link-lib={l}");
        }
    }
}
