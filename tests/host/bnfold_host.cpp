// The kernels' per-element code (kernels/bnfold_math.cuh) compiled for the CPU, with the launches
// emulated by loops over every (block, thread), so tests can compare it with the NumPy backend.
#include "../../kernels/bnfold_math.cuh"

extern "C" {

long long bnfold_host_channel64(long long e, long long inner, long long channels, long long rows) {
  return bnfold_channel<long long>(e, inner, channels, rows);
}

int bnfold_host_channel32(int e, int inner, int channels, int rows) {
  return bnfold_channel<int>(e, inner, channels, rows);
}

unsigned int bnfold_host_fastdiv(unsigned int n, unsigned long long packed) {
  return bnfold_fastdiv(n, packed);
}

void bnfold_host_half_to_float(const unsigned short* h, float* f, long long n) {
  for (long long i = 0; i < n; ++i) f[i] = bnfold_half_to_float(h[i]);
}

void bnfold_host_float_to_half(const float* f, unsigned short* h, long long n) {
  for (long long i = 0; i < n; ++i) h[i] = bnfold_float_to_half(f[i]);
}

void bnfold_host_channels(const bnfold_channel_seg* segs, int n_segs, long long total,
                          double* scale_d, float* scale_f, double* offset, double* mean_d,
                          double* beta_d, int* status) {
  for (long long c = 0; c < total; ++c) {
    int fold;
    int bits = bnfold_channel_stage(segs, n_segs, c, scale_d, scale_f, offset, mean_d, beta_d, &fold);
    status[fold] |= bits;
  }
}

void bnfold_host_biases(const bnfold_array_seg* segs, int n_segs, long long total,
                        const double* scale_d, const double* mean_d, const double* beta_d,
                        int* flags) {
  for (long long e = 0; e < total; ++e)
    bnfold_bias_stage(segs, n_segs, e, scale_d, mean_d, beta_d, flags);
}

void bnfold_host_copy(const bnfold_array_seg* segs, int n_segs, long long total) {
  for (long long e = 0; e < total; ++e) bnfold_copy_stage(segs, n_segs, e);
}

void bnfold_host_weight_check(const bnfold_array_seg* segs, int n_segs, long long blocks,
                              const double* scale_d, const float* scale_f, int* flags) {
  for (long long b = 0; b < blocks; ++b)
    for (int t = 0; t < BNFOLD_BLOCK; ++t)
      bnfold_check_block(segs, n_segs, b, t, scale_d, scale_f, flags);
}

void bnfold_host_input_biases(const bnfold_input_seg* segs, int n_segs, long long blocks,
                              const double* offset, int* flags) {
  double sums[BNFOLD_BLOCK];
  for (long long b = 0; b < blocks; ++b) {
    int seg = bnfold_input_segment(segs, n_segs, b);
    const bnfold_input_seg& s = segs[seg];
    long long o = b - s.first_block;
    for (int t = 0; t < BNFOLD_BLOCK; ++t) sums[t] = bnfold_input_partial(s, o, t, offset);
    for (int half = BNFOLD_BLOCK / 2; half > 0; half /= 2)
      for (int t = 0; t < BNFOLD_BLOCK; ++t) bnfold_tree_step(sums, t, half);
    bnfold_input_store(s, o, sums[0], flags + seg);
  }
}

void bnfold_host_weights(const bnfold_array_seg* segs, int n_segs, long long blocks,
                         const double* scale_d, const float* scale_f) {
  for (long long b = 0; b < blocks; ++b)
    for (int t = 0; t < BNFOLD_BLOCK; ++t) bnfold_weight_block(segs, n_segs, b, t, scale_d, scale_f);
}

}
