// Entry point of the native extension conceptevo._C.
// Each source file registers its functions through a register_* hook so the
// stages stay in separate translation units.
#include <pybind11/pybind11.h>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

void register_sgns(py::module_& m);  // sgns.cpp

static int max_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

PYBIND11_MODULE(_C, m) {
    m.doc() = "Native kernels of the ConceptEvo engine (OpenMP, GIL released in hot loops).";
    m.def("max_threads", &max_threads, "Number of OpenMP threads available (1 when built without OpenMP).");
    m.attr("has_openmp") =
#ifdef _OPENMP
        true;
#else
        false;
#endif
    register_sgns(m);
}
