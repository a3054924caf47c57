/* Lets Intel MKL run its AVX512 code on AMD processors (see encdec/mkl.py).
 *
 * MKL picks its code path from the CPU's vendor as well as its features: on AMD it takes the AVX2
 * path even where the CPU has AVX512. MKL asks `mkl_serv_intel_cpu_true()` whether the CPU is an
 * Intel one; PyTorch's wheels link MKL into libtorch_cpu.so with that function exported, so a
 * definition loaded into the process's global symbol scope before libtorch_cpu.so takes its place.
 * MKL then chooses among its paths by the CPU's feature flags, as it does on Intel CPUs.
 *
 * Plain C, no Python headers: encdec/mkl.py loads it with ctypes (RTLD_GLOBAL), not as a module.
 */
static long consulted_count = 0;

__attribute__((visibility("default"))) int mkl_serv_intel_cpu_true(void) {
    consulted_count++;
    return 1;
}

/* How many times MKL has asked whether the CPU is Intel's: whether the shim took effect. */
__attribute__((visibility("default"))) long encdec_mkl_consulted(void) { return consulted_count; }
