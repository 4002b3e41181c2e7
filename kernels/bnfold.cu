// The fold as a fixed number of launches, whatever the number of layers (tables of per-layer
// segments, in the spirit of multi-tensor apply). Before anything is written: per-channel
// scale/offset, the read-only overflow check of the weights, and every new bias computed into scratch
// memory (output side, BN -> layer). Then the writes: the biases copied into place, the weights.
// The per-element code is in bnfold_math.cuh, which the host tests also compile.
#include "bnfold_math.cuh"

extern "C" __global__ void bnfold_channels(const bnfold_channel_seg* segs, int n_segs,
                                           bnfold_i64 total, double* scale_d, float* scale_f,
                                           double* offset, double* mean_d, double* beta_d,
                                           int* status) {
  bnfold_i64 c = (bnfold_i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= total) return;
  int fold;
  int bits = bnfold_channel_stage(segs, n_segs, c, scale_d, scale_f, offset, mean_d, beta_d, &fold);
  if (bits) atomicOr(status + fold, bits);
}

extern "C" __global__ void bnfold_biases(const bnfold_array_seg* segs, int n_segs, bnfold_i64 total,
                                         const double* scale_d, const double* mean_d,
                                         const double* beta_d, int* flags) {
  bnfold_i64 e = (bnfold_i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= total) return;
  bnfold_bias_stage(segs, n_segs, e, scale_d, mean_d, beta_d, flags);
}

extern "C" __global__ void bnfold_copy(const bnfold_array_seg* segs, int n_segs, bnfold_i64 total) {
  bnfold_i64 e = (bnfold_i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= total) return;
  bnfold_copy_stage(segs, n_segs, e);
}

extern "C" __global__ void __launch_bounds__(BNFOLD_BLOCK)
bnfold_weight_check(const bnfold_array_seg* segs, int n_segs, const double* scale_d,
                    const float* scale_f, int* flags) {
  bnfold_check_block(segs, n_segs, (bnfold_i64)blockIdx.x, (int)threadIdx.x, scale_d, scale_f, flags);
}

extern "C" __global__ void __launch_bounds__(BNFOLD_BLOCK)
bnfold_weights(const bnfold_array_seg* segs, int n_segs, const double* scale_d,
               const float* scale_f) {
  bnfold_weight_block(segs, n_segs, (bnfold_i64)blockIdx.x, (int)threadIdx.x, scale_d, scale_f);
}

extern "C" __global__ void __launch_bounds__(BNFOLD_BLOCK)
bnfold_input_biases(const bnfold_input_seg* segs, int n_segs, const double* offset, int* flags) {
  __shared__ double sums[BNFOLD_BLOCK];
  int seg = bnfold_input_segment(segs, n_segs, (bnfold_i64)blockIdx.x);
  const bnfold_input_seg& s = segs[seg];
  bnfold_i64 o = (bnfold_i64)blockIdx.x - s.first_block;
  sums[threadIdx.x] = bnfold_input_partial(s, o, (int)threadIdx.x, offset);
  __syncthreads();
  for (int half = BNFOLD_BLOCK / 2; half > 0; half /= 2) {
    bnfold_tree_step(sums, (int)threadIdx.x, half);
    __syncthreads();
  }
  if (threadIdx.x == 0) bnfold_input_store(s, o, sums[0], flags + seg);
}
