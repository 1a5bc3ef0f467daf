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
    shim::generate(&shim::Lib {
        pkg: "libfabric",
        min_version: Some("1.17"),
        install: "the `libfabric` feature needs libfabric >= 1.17 with its headers, found through pkg-config \
                  (Debian/Ubuntu: apt-get install libfabric-dev)",
        headers: &[
            "rdma/fabric.h",
            "rdma/fi_domain.h",
            "rdma/fi_endpoint.h",
            "rdma/fi_tagged.h",
            "rdma/fi_cm.h",
            "rdma/fi_eq.h",
            "rdma/fi_rma.h",
            "rdma/fi_errno.h",
        ],
        allow: ("fi_.*", "fi_.*|fid_.*|fid", "FI_.*"),
        consts: false,
        name: "fabric",
    });
    #[cfg(feature = "ibverbs")]
    shim::generate(&shim::Lib {
        pkg: "libibverbs",
        min_version: None,
        install: "the `ibverbs` feature needs rdma-core's libibverbs with its headers, found through pkg-config \
                  (Debian/Ubuntu: apt-get install libibverbs-dev)",
        headers: &["infiniband/verbs.h"],
        allow: ("ibv_.*", "ibv_.*", "IBV_.*"),
        // Enums as plain integer constants (flags are or-ed together).
        consts: true,
        name: "verbs",
    });
}

#[cfg(any(feature = "libfabric", feature = "ibverbs"))]
mod shim {
    use std::path::PathBuf;

    /// A C library to bind: its pkg-config name, headers, and what of them to bind.
    pub struct Lib {
        pub pkg: &'static str,
        pub min_version: Option<&'static str>,
        /// What to say when it is missing.
        pub install: &'static str,
        pub headers: &'static [&'static str],
        /// Functions, types, variables (regular expressions).
        pub allow: (&'static str, &'static str, &'static str),
        /// Enums as constants without their enum's name in front.
        pub consts: bool,
        /// `{name}_sys.rs` in OUT_DIR, the static library `oxccl_{name}_static`.
        pub name: &'static str,
    }

    pub fn generate(l: &Lib) {
        let mut cfg = pkg_config::Config::new();
        if let Some(v) = l.min_version {
            cfg.atleast_version(v);
        }
        let lib = cfg.probe(l.pkg).unwrap_or_else(|e| panic!("{}: {e}", l.install));
        let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
        let wrapper = out.join(format!("{}_wrapper.h", l.name));
        let text: String = l.headers.iter().map(|h| format!("#include <{h}>\n")).collect();
        std::fs::write(&wrapper, text).expect("write the wrapper header");
        let statics = out.join(format!("{}_static_fns", l.name));
        let mut b = bindgen::Builder::default()
            .header(wrapper.to_string_lossy())
            .allowlist_function(l.allow.0)
            .allowlist_type(l.allow.1)
            .allowlist_var(l.allow.2)
            .wrap_static_fns(true)
            .wrap_static_fns_path(&statics)
            .derive_default(true)
            .layout_tests(false)
            .generate_comments(false)
            .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()));
        if l.consts {
            b = b.default_enum_style(bindgen::EnumVariation::Consts).prepend_enum_name(false);
        }
        for p in &lib.include_paths {
            b = b.clang_arg(format!("-I{}", p.display()));
        }
        let bindings = b.generate().unwrap_or_else(|e| panic!("bindgen over {}'s headers: {e}", l.pkg));
        bindings.write_to_file(out.join(format!("{}_sys.rs", l.name))).expect("write the bindings");
        let mut c = cc::Build::new();
        c.file(statics.with_extension("c")).include(&out).warnings(false);
        for p in &lib.include_paths {
            c.include(p);
        }
        // The generated C file includes the wrapper header by its absolute path.
        c.compile(&format!("oxccl_{}_static", l.name));
        for p in &lib.link_paths {
            println!("cargo:rustc-link-search=native={}", p.display());
        }
        for lib in &lib.libs {
            println!("cargo:rustc-link-lib={lib}");
        }
    }
}
