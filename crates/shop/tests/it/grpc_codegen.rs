//! The checked-in generated code matches the protos (as in switchyard-rpc, decision
//! 0005). Regenerate with `SHOP_REGEN_PROTO=1 cargo test -p shop --test it grpc_codegen`.

use std::path::Path;

/// Generates `proto` into a temp dir and compares (or, with `SHOP_REGEN_PROTO`, writes)
/// `generated`.
fn check(proto: &str, module: &str, generated: &str) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = tempfile::tempdir().unwrap();
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path().unwrap());
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(false)
        .emit_rerun_if_changed(false)
        .out_dir(out.path())
        .compile_with_config(config, &[root.join(proto)], &[root.join("proto")])
        .unwrap();
    let fresh = std::fs::read_to_string(out.path().join(format!("{module}.rs"))).unwrap();
    let target = root.join(generated);
    if std::env::var_os("SHOP_REGEN_PROTO").is_some() {
        std::fs::write(&target, &fresh).unwrap();
        return;
    }
    let checked_in = std::fs::read_to_string(&target).unwrap_or_default();
    assert!(
        checked_in == fresh,
        "{generated} is stale: run SHOP_REGEN_PROTO=1 cargo test -p shop --test it grpc_codegen"
    );
}

#[test]
fn generated_code_is_up_to_date() {
    check(
        "proto/payment.proto",
        "shop.payment.v1",
        "src/services/generated/shop.payment.v1.rs",
    );
}

#[test]
fn generated_order_code_is_up_to_date() {
    check(
        "proto/order.proto",
        "shop.order.v1",
        "src/api/generated/shop.order.v1.rs",
    );
}
