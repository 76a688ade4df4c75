// faststeal._C: the C++ CPU kernels (csrc/cpu) and, when built with a CUDA toolkit, the CUDA
// kernels (csrc/cuda, registered by bind_cuda). Entry points are named <op>_<fwd|bwd>_<device>
// and follow the backend contract of faststeal/ops/reference.py; Python wrappers live in
// faststeal/ops/cpp_backend.py and faststeal/ops/cuda_backend.py.
#include <torch/extension.h>

#include "common.h"
#include "ops.h"

#ifdef WITH_CUDA
namespace faststeal {
void bind_cuda(pybind11::module_& m);  // csrc/cuda/bind_cuda.cpp
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  namespace c = faststeal::cpu;
  m.doc() = "faststeal compiled kernels (C++ CPU; CUDA when WITH_CUDA)";
#ifdef WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif

  m.def("_set_poison_outputs", &faststeal::set_poison_outputs,
        "testing aid: fill outputs with NaN / a sentinel before the kernels write them",
        py::arg("on"));
  m.def("_cpu_gemm_library", &c::detail::cpu_gemm_library,
        "the GEMM paths of the CPU ops and the default rule used without tuning");
  m.def(
      "_set_cpu_gemm_path",
      [](int64_t path) {
        TORCH_CHECK(path >= 0 && path <= static_cast<int64_t>(c::GemmPath::kUpcast),
                    "_set_cpu_gemm_path: path must be 0 (default), 1 (onednn), 2 (bmm), 3 (mm), ",
                    "4 (packed) or 5 (upcast), got ", path);
        return static_cast<int64_t>(c::set_cpu_gemm_path(static_cast<c::GemmPath>(path)));
      },
      "set the GEMM path of the CPU ops on this thread (0 default, 1 onednn, 2 bmm, 3 mm, "
      "4 packed, 5 upcast); returns the previous one",
      py::arg("path"));
  m.def("ensemble_linear_fwd_cpu", &c::ensemble_linear_fwd, "(y, z) = ensemble_linear forward",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("activation"),
        py::arg("dropout_p"), py::arg("key"));
  m.def("ensemble_linear_bwd_cpu", &c::ensemble_linear_bwd,
        "(dx or empty, dweight, dbias or empty) = ensemble_linear backward", py::arg("grad_y"),
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("y"), py::arg("z"),
        py::arg("activation"), py::arg("dropout_p"), py::arg("key"), py::arg("need_dx") = true);
  m.def("bayes_linear_fwd_cpu", &c::bayes_linear_fwd, "y = bayes_linear forward", py::arg("x"),
        py::arg("w_mu"), py::arg("w_rho"), py::arg("b_mu"), py::arg("b_rho"), py::arg("samples"),
        py::arg("key_w"), py::arg("key_b"));
  m.def("bayes_linear_bwd_cpu", &c::bayes_linear_bwd,
        "[dx, dw_mu, dw_rho, db_mu, db_rho] = bayes_linear backward (bias grads empty without "
        "bias)",
        py::arg("grad_y"), py::arg("x"), py::arg("w_mu"), py::arg("w_rho"), py::arg("b_mu"),
        py::arg("b_rho"), py::arg("samples"), py::arg("key_w"), py::arg("key_b"),
        py::arg("need_dx") = true);
  m.def("gaussian_kl_fwd_cpu", &c::gaussian_kl_fwd, "sum of KL(q || prior), acc dtype scalar",
        py::arg("mu"), py::arg("rho"), py::arg("prior_sigma"));
  m.def("gaussian_kl_bwd_cpu", &c::gaussian_kl_bwd, "(dmu, drho)", py::arg("grad"), py::arg("mu"),
        py::arg("rho"), py::arg("prior_sigma"));
  m.def("member_stats_fwd_cpu", &c::member_stats_fwd,
        "the 9 MemberStats fields of (S, B, C) logits", py::arg("logits"), py::arg("targets"));
  m.def("ensemble_cross_entropy_fwd_cpu", &c::ensemble_cross_entropy_fwd,
        "(S,) per-member mean cross-entropy", py::arg("logits"), py::arg("target"));
  m.def("ensemble_cross_entropy_bwd_cpu", &c::ensemble_cross_entropy_bwd, "dlogits",
        py::arg("grad"), py::arg("logits"), py::arg("target"));
  m.def("max_pool2d_fwd_cpu", &c::max_pool2d_fwd,
        "max_pool2d (of relu(x) with relu) over non-overlapping k x k windows of contiguous "
        "NCHW x", py::arg("x"), py::arg("kernel_size"), py::arg("relu") = false);
  m.def("max_pool2d_bwd_cpu", &c::max_pool2d_bwd, "dx of max_pool2d_fwd_cpu", py::arg("grad_y"),
        py::arg("x"), py::arg("kernel_size"), py::arg("relu") = false);
  m.def("adam_bf16_step_cpu", &c::adam_bf16_step,
        "in place: one Adam update of the first counts[i] elements of float32 params from bf16 "
        "(+ float32) grads, and of their bfloat16 copies (lists, one entry per param; grads_f32 "
        "entries may be None)",
        py::arg("params"), py::arg("grads_bf16"), py::arg("grads_f32"), py::arg("exp_avgs"),
        py::arg("exp_avg_sqs"), py::arg("copies"), py::arg("steps"), py::arg("counts"),
        py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
        py::arg("weight_decay"));
  m.def("conv2d_direct_isa", &c::conv2d_direct_isa,
        "the vector ISA conv2d_direct runs on this CPU: 2 AVX-512, 1 AVX2+FMA, 0 none "
        "(unavailable)");
  m.def("conv2d_direct_fwd_cpu", &c::conv2d_direct_fwd,
        "S stacked stride-1 convolutions (S,B,C,H,W) x (S,O,C,KH,KW) -> (S,B,O,Ho,Wo)",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("ph"), py::arg("pw"),
        py::arg("isa") = 0);
  m.def("conv2d_direct_dw_cpu", &c::conv2d_direct_dw,
        "(dweight, dbias or None) of conv2d_direct_fwd_cpu", py::arg("grad_y"), py::arg("x"),
        py::arg("kh"), py::arg("kw"), py::arg("ph"), py::arg("pw"), py::arg("need_bias"),
        py::arg("isa") = 0);

#ifdef WITH_CUDA
  faststeal::bind_cuda(m);
#endif
}
