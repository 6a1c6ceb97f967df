#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = dssm_certs::pki::DhParams::validate(data, "fuzz");
});
