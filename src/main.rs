fn main() {
    fixed_mmap_threshold();
    std::process::exit(amqproxy::app::main());
}

/// Blocks of this size and up get their own mapping, returned to the
/// system when freed.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: i32 = 1024 * 1024;

/// glibc's malloc raises its mmap threshold to the size of every large
/// block freed (up to 32 MiB). After the first slow consumer's buffer is
/// dropped, buffers of a few MiB then come from the heap, and what they
/// free stays in the process: `client_buffer_budget` bounds what the proxy
/// holds, not its RSS. Measured with tests/python/test_slow_consumers.py
/// (32 MiB budget): RSS peaked 26 to 50 MiB over the baseline with the
/// default (the test's bound is 48), and 28.2 to 32.0 MiB in six runs with
/// the threshold fixed at 1 MiB (setting it turns the adjustment off).
/// Left alone when the operator set it through the environment.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn fixed_mmap_threshold() {
    let set_by_env = std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_some()
        || std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("mmap_threshold"));
    if set_by_env {
        return;
    }
    extern "C" {
        fn mallopt(param: i32, value: i32) -> i32;
    }
    /// From glibc's malloc.h.
    const M_MMAP_THRESHOLD: i32 = -3;
    // SAFETY: mallopt is glibc's own, takes two ints and only changes the
    // allocator's parameters; it runs before any other thread exists. The
    // only unsafe code of the program (the library forbids it).
    unsafe {
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn fixed_mmap_threshold() {}
