#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = dssm_certs::pki::Subject::parse(s);
        let _ = dssm_certs::cli::parse_duration(s);
        let _ = dssm_certs::manifest::validate_namespace(s);
    }
});
