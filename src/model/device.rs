//! Run-time device choice. candle's constructors return an error when the backend was not
//! compiled in, so no `#[cfg]` is needed here.

use std::str::FromStr;

use candle_core::Device;

use super::ModelError;

/// What `--device` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// The best backend this build has: CUDA, then Metal, then CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
    Metal,
}

impl FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda),
            "metal" => Ok(Self::Metal),
            other => Err(format!(
                "unknown device '{other}'; expected auto, cpu, cuda or metal"
            )),
        }
    }
}

/// Open the device `choice` names.
///
/// # Errors
/// The backend is not compiled in (build with `--features cuda` or `metal`) or has no device.
pub fn select_device(choice: DeviceChoice) -> Result<Device, ModelError> {
    let fail = |name: &str, e: candle_core::Error| {
        ModelError::Device(format!(
            "cannot use {name}: {e} (build with `--features {name}` on a machine that has one)"
        ))
    };
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda => Device::new_cuda(0).map_err(|e| fail("cuda", e)),
        DeviceChoice::Metal => Device::new_metal(0).map_err(|e| fail("metal", e)),
        DeviceChoice::Auto => {
            if candle_core::utils::cuda_is_available() {
                Device::new_cuda(0).map_err(|e| fail("cuda", e))
            } else if candle_core::utils::metal_is_available() {
                Device::new_metal(0).map_err(|e| fail("metal", e))
            } else {
                Ok(Device::Cpu)
            }
        }
    }
}
