//! OXCCL_NCCL_CLASS picks each communicator's traffic class from its commName or its size;
//! the rest keep the process's class. Alone in its test binary: it sets the variable.

mod common;

use common::*;
use oxccl_nccl::*;

#[test]
fn communicators_get_their_class_from_the_rules() {
    std::env::set_var("OXCCL_NCCL_CLASS", "name:refit*=weight_refit, size:3=pipeline_stage");
    std::env::remove_var("OXCCL_CLASS");
    let got = ranks(2, Some(config(Some(c"refit-trainers+vllm"))), |_, c| (class_of(c), sum_i32(c, 1)));
    assert!(got.iter().all(|(k, s)| k == "weight_refit" && *s == 2), "{got:?}");
    let got = ranks(3, None, |_, c| class_of(c));
    assert!(got.iter().all(|k| k == "pipeline_stage"), "{got:?}");
    let got = ranks(2, Some(config(Some(c"grads"))), |_, c| class_of(c));
    assert!(got.iter().all(|k| k == "bulk"), "no rule matches: the default class: {got:?}");
    // A split is named by its own configuration.
    let got = ranks(2, None, |_, c| {
        let mut sub: ncclComm_t = std::ptr::null_mut();
        let mut cfg = config(Some(c"refit-split"));
        // SAFETY: valid pointers.
        assert_eq!(unsafe { ncclCommSplit(c, 0, 0, &mut sub, &mut cfg) }, ncclSuccess, "{}", last());
        let k = class_of(sub);
        // SAFETY: made above.
        assert_eq!(unsafe { ncclCommDestroy(sub) }, ncclSuccess);
        k
    });
    assert!(got.iter().all(|k| k == "weight_refit"), "{got:?}");
    // A bad rule: creation fails with its words.
    std::env::set_var("OXCCL_NCCL_CLASS", "size:two=gradient");
    let mut c: ncclComm_t = std::ptr::null_mut();
    // SAFETY: valid out pointer.
    assert_eq!(unsafe { ncclCommInitRank(&mut c, 1, id(), 0) }, ncclInvalidArgument);
    assert!(last().contains("OXCCL_NCCL_CLASS"), "{}", last());
    std::env::remove_var("OXCCL_NCCL_CLASS");
}
