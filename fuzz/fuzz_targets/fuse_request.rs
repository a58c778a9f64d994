#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| hyperbox_fuzz::fuse_request(data));
