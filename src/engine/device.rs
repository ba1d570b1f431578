//! Device names: `cpu`, `cuda` or `cuda:N`, checked before any device is opened.

/// Checks a device name (`cpu`, `cuda`, `cuda:N`); the error says what is accepted.
pub fn validate_device(s: &str) -> Result<String, String> {
    let valid = s == "cpu"
        || s == "cuda"
        || s.strip_prefix("cuda:")
            .is_some_and(|n| n.parse::<usize>().is_ok());
    if valid {
        Ok(s.to_owned())
    } else {
        Err(format!("{s:?} is not a device; use cpu, cuda or cuda:N"))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn accepts_cpu_and_cuda_devices_only() {
        for ok in ["cpu", "cuda", "cuda:0", "cuda:12"] {
            assert_eq!(super::validate_device(ok).as_deref(), Ok(ok));
        }
        for bad in ["gpu", "cuda:", "cuda:x", "CPU", ""] {
            assert!(super::validate_device(bad).is_err(), "{bad}");
        }
    }
}
