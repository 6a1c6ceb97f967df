#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(k) = dssm_certs::pki::PrivateKey::from_pem(data, "fuzz") {
        let _ = k.public_key_der();
    }
});
