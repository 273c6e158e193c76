//! Task service frames, task IDs and result file names: no panic; what parses is valid.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pilotd::tasks::{
    parse_frame, sanitize_filename, valid_task_id, Request, ResultData, MAX_FILENAME,
    MAX_RESULT_BYTES,
};

fuzz_target!(|data: &[u8]| {
    if let Ok((req, used)) = parse_frame(data) {
        assert!(used <= data.len());
        let id = match &req {
            Request::Submit { task_id, .. }
            | Request::StatusUpdate { task_id, .. }
            | Request::SendResults { task_id, .. } => task_id,
        };
        assert!(valid_task_id(id));
        if let Request::SendResults {
            result: ResultData::File { name, data },
            ..
        } = &req
        {
            assert!(data.len() <= MAX_RESULT_BYTES);
            assert!(!name.contains('/') && !name.contains('\\') && !name.starts_with('.'));
        }
    }
    if let Some(n) = sanitize_filename(&String::from_utf8_lossy(data)) {
        assert!(n.len() <= MAX_FILENAME);
        assert!(!n.contains('/') && !n.starts_with('.') && !n.chars().any(char::is_control));
    }
});
