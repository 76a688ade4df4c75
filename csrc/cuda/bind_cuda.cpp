// Registers the CUDA entry points of faststeal._C (compiled only with -DWITH_CUDA=1; called from
// csrc/bindings.cpp). Names mirror the CPU ones with a _cuda suffix.
#include <torch/extension.h>

#include "ops_cuda.h"

namespace faststeal {

void bind_cuda(pybind11::module_& m) {
  namespace py = pybind11;
  namespace g = faststeal::gpu;
  m.def("ensemble_linear_fwd_cuda", &g::ensemble_linear_fwd, "(y, z) = ensemble_linear forward",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("activation"),
        py::arg("dropout_p"), py::arg("key"));
  m.def("ensemble_linear_bwd_cuda", &g::ensemble_linear_bwd,
        "(dx or empty, dweight, dbias or empty) = ensemble_linear backward", py::arg("grad_y"),
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("y"), py::arg("z"),
        py::arg("activation"), py::arg("dropout_p"), py::arg("key"), py::arg("need_dx") = true);
  m.def("bayes_linear_fwd_cuda", &g::bayes_linear_fwd, "y = bayes_linear forward", py::arg("x"),
        py::arg("w_mu"), py::arg("w_rho"), py::arg("b_mu"), py::arg("b_rho"), py::arg("samples"),
        py::arg("key_w"), py::arg("key_b"));
  m.def("bayes_linear_bwd_cuda", &g::bayes_linear_bwd,
        "[dx, dw_mu, dw_rho, db_mu, db_rho] = bayes_linear backward", py::arg("grad_y"),
        py::arg("x"), py::arg("w_mu"), py::arg("w_rho"), py::arg("b_mu"), py::arg("b_rho"),
        py::arg("samples"), py::arg("key_w"), py::arg("key_b"), py::arg("need_dx") = true);
  m.def("gaussian_kl_fwd_cuda", &g::gaussian_kl_fwd, "sum of KL(q || prior), acc dtype scalar",
        py::arg("mu"), py::arg("rho"), py::arg("prior_sigma"));
  m.def("gaussian_kl_bwd_cuda", &g::gaussian_kl_bwd, "(dmu, drho)", py::arg("grad"),
        py::arg("mu"), py::arg("rho"), py::arg("prior_sigma"));
  m.def("member_stats_fwd_cuda", &g::member_stats_fwd,
        "the 9 MemberStats fields of (S, B, C) logits", py::arg("logits"), py::arg("targets"));
  m.def("ensemble_cross_entropy_fwd_cuda", &g::ensemble_cross_entropy_fwd,
        "(S,) per-member mean cross-entropy", py::arg("logits"), py::arg("target"));
  m.def("ensemble_cross_entropy_bwd_cuda", &g::ensemble_cross_entropy_bwd, "dlogits",
        py::arg("grad"), py::arg("logits"), py::arg("target"));
}

}  // namespace faststeal
