//! net-libfabric: libfabric RDM endpoints (EFA, verbs, tcp;ofi_rxm, shm).
pub mod fabric;
mod sys;

#[cfg(test)]
mod tests {
    use super::fabric::*;

    #[test]
    fn an_endpoint_sends_to_itself() {
        let provs = match providers() {
            Ok(p) => p,
            Err(e) => {
                println!("skipped: no libfabric provider: {e}");
                return;
            }
        };
        println!("{provs:#?}");
        let mut ep = Endpoint::open(|p| p.name.contains("tcp"), 128).expect("open");
        let me = ep.name().to_vec();
        let a = ep.insert(&me).expect("insert");
        let src = vec![7u8; 100_000];
        let mut dst = vec![0u8; 100_000];
        let mut cs = OpCtx::new(1);
        let mut cr = OpCtx::new(2);
        let mr = unsafe { ep.register(src.as_ptr(), src.len(), false) }.unwrap();
        let mr2 = unsafe { ep.register(dst.as_ptr(), dst.len(), false) }.unwrap();
        assert!(unsafe { ep.trecv(dst.as_mut_ptr(), dst.len(), mr2.desc(), 42, &mut *cr) }.unwrap());
        let mut out = Vec::new();
        let t = std::time::Instant::now();
        // -FI_EAGAIN (the connection is still being made): progress, then post again.
        while !unsafe { ep.tsend(src.as_ptr(), src.len(), mr.desc(), a, 42, &mut *cs) }.unwrap() {
            ep.poll(&mut out, 16).unwrap();
            assert!(t.elapsed().as_secs() < 10);
        }
        while out.len() < 2 && t.elapsed().as_secs() < 10 {
            ep.poll(&mut out, 16).unwrap();
        }
        println!("{out:?}");
        assert_eq!(out.len(), 2);
        assert_eq!(dst, src);
    }
}
