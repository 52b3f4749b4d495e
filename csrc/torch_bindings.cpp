// torch_bindings.cpp: the op schemas of torch.ops.weightedkv (docs/design.md), defined once, and
// the empty Python module weightedkv_ext._C whose import loads this library (and so registers
// the schemas and the CPU/CUDA kernels).
#include <torch/library.h>

TORCH_LIBRARY(weightedkv, m) {
  m.def(
      "append(Tensor(a!) keys, Tensor(b!) values, Tensor(c!) scores, Tensor(d!) counts, "
      "Tensor(e!) last, Tensor(f!) slot_pos, Tensor new_keys, Tensor new_values, "
      "Tensor new_pos) -> ()");
  m.def(
      "accumulate(Tensor probs, Tensor slot_pos, Tensor query_pos, Tensor(a!) scores, "
      "Tensor(b!) counts, Tensor(c!) last, str group_reduce=\"mean\") -> ()");
  m.def(
      "compress(Tensor(a!) keys, Tensor(b!) values, Tensor(c!) scores, Tensor(d!) counts, "
      "Tensor(e!) last, Tensor(f!) slot_pos, int budget, int sinks, int recent, str policy, "
      "int cam_window=16, int seed=0, int head_offset=0, str merge_target=\"right\", "
      "float merge_gate=0.0, str merge_weights=\"average\", Tensor(g!)? merged=None) -> ()");
  // decode_attention / block_attention: window, softcap, sinks (GPT-OSS s_aux, float32 [Hq])
  // as in docs/design.md; out is caller-allocated ([B, Hq, D] / [B, Hq, Q, D], query dtype).
  m.def(
      "decode_attention(Tensor query, Tensor keys, Tensor values, Tensor slot_pos, "
      "Tensor query_pos, Tensor(a!) scores, Tensor(b!) counts, Tensor(c!) last, float scale, "
      "str group_reduce=\"mean\", *, int window=0, float softcap=0.0, Tensor? sinks=None, "
      "Tensor(d!) out) -> ()");
  m.def(
      "block_attention(Tensor query, Tensor keys, Tensor values, Tensor slot_pos, "
      "Tensor query_pos, Tensor(a!) scores, Tensor(b!) counts, Tensor(c!) last, float scale, "
      "str group_reduce=\"mean\", *, int window=0, float softcap=0.0, Tensor? sinks=None, "
      "Tensor(d!) out) -> ()");
  // snap_compress: the prompt-end step of the "snapkv" prompt mode (one-shot top-k by pooled
  // window scores, optional merge); kept [B, H, C] int64 is caller-allocated.
  m.def(
      "snap_compress(Tensor(a!) keys, Tensor(b!) values, Tensor(c!) scores, Tensor(d!) counts, "
      "Tensor(e!) last, Tensor(f!) slot_pos, int budget, int sinks, int recent, int pool, "
      "bool merge, *, Tensor(g!) kept) -> ()");
}

// Exported so that a non-Python consumer (the C++ tests) can force this library to load.
extern "C" int wkv_core_abi_version() { return 1; }

#ifdef WKV_PYTHON_MODULE
#include <Python.h>

// A module without functions: importing weightedkv_ext._C only loads the library.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                          "weightedkv ops (see torch.ops.weightedkv)", -1,
                                          nullptr};
  return PyModule_Create(&module_def);
}
#endif
