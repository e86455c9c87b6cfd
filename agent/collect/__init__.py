"""GPU collectors: real NVML (`nvml`) and simulated (`simulated`) behind one interface (`base`)."""
