#![no_main]
// Certificates come from Secrets anyone with edit rights can write.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(c) = dssm_certs::pki::parse_certificate(data, "fuzz") {
        let _ = c.is_self_signed();
    }
});
