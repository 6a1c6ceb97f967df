#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| dssm_certs::fuzz::resp_reply(data));
