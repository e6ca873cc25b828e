"""One package per paper. A paper's package uses the engine (`repro`) and the kernels, never another paper."""
