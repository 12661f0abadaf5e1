// The Python module `densenet_efficient._C`. Importing it loads this library,
// whose static initialisers register the operators; the module itself only
// exposes the CUDA launch plans (pure host functions, launch_plan.h) so that
// CPU tests can check their edge cases.
#include "launch_plan.h"

#include <Python.h>

#include <cstdint>
#include <vector>

namespace {

using densenet_efficient::launch::PlaneLayout;
using densenet_efficient::launch::Shape;

// (batch, channels, plane_size, element_size, [(address, stride_n, stride_c), ...], multiprocessors)
bool parse_plan_args(
    PyObject* args,
    Shape& shape,
    int& element_size,
    std::vector<PlaneLayout>& tensors,
    long long& multiprocessors) {
  long long batch = 0, channels = 0, plane_size = 0;
  PyObject* layouts = nullptr;
  if (!PyArg_ParseTuple(
          args, "LLLiO!L", &batch, &channels, &plane_size, &element_size, &PyList_Type,
          &layouts, &multiprocessors)) {
    return false;
  }
  if (batch <= 0 || channels <= 0 || plane_size <= 0 || multiprocessors <= 0 ||
      (element_size != 1 && element_size != 2 && element_size != 4 && element_size != 8)) {
    PyErr_SetString(
        PyExc_ValueError,
        "launch plan: expected positive batch, channels, plane_size and multiprocessors "
        "and an element size of 1, 2, 4 or 8 bytes");
    return false;
  }
  shape = {batch, channels, plane_size};
  for (Py_ssize_t i = 0; i < PyList_Size(layouts); ++i) {
    unsigned long long address = 0;
    long long stride_n = 0, stride_c = 0;
    if (!PyArg_ParseTuple(PyList_GetItem(layouts, i), "KLL", &address, &stride_n, &stride_c)) {
      return false;
    }
    tensors.push_back({static_cast<uintptr_t>(address), stride_n, stride_c});
  }
  return true;
}

PyObject* plan_elementwise(PyObject* /*self*/, PyObject* args) {
  Shape shape{};
  int element_size = 0;
  std::vector<PlaneLayout> tensors;
  long long multiprocessors = 0;
  if (!parse_plan_args(args, shape, element_size, tensors, multiprocessors)) {
    return nullptr;
  }
  const auto plan =
      densenet_efficient::launch::plan_elementwise(shape, element_size, tensors, multiprocessors);
  return Py_BuildValue(
      "{s:i,s:L,s:L,s:L,s:L,s:L,s:O}", "vector", plan.vector, "channels_per_run",
      static_cast<long long>(plan.channels_per_run), "run_length",
      static_cast<long long>(plan.run_length), "runs", static_cast<long long>(plan.runs),
      "vectors", static_cast<long long>(plan.vectors), "blocks",
      static_cast<long long>(plan.blocks), "index32", plan.index32 ? Py_True : Py_False);
}

PyObject* plan_reduction(PyObject* /*self*/, PyObject* args) {
  Shape shape{};
  int element_size = 0;
  std::vector<PlaneLayout> tensors;
  long long multiprocessors = 0;
  if (!parse_plan_args(args, shape, element_size, tensors, multiprocessors)) {
    return nullptr;
  }
  const auto plan =
      densenet_efficient::launch::plan_reduction(shape, element_size, tensors, multiprocessors);
  return Py_BuildValue(
      "{s:i,s:L,s:L,s:L,s:L,s:O}", "vector", plan.vector, "vectors_per_plane",
      static_cast<long long>(plan.vectors_per_plane), "vectors_per_channel",
      static_cast<long long>(plan.vectors_per_channel), "chunks",
      static_cast<long long>(plan.chunks), "chunk", static_cast<long long>(plan.chunk), "index32",
      plan.index32 ? Py_True : Py_False);
}

PyObject* plan_rows(PyObject* /*self*/, PyObject* args) {
  long long rows = 0, channels = 0, multiprocessors = 0;
  int reduction = 0;
  if (!PyArg_ParseTuple(args, "LLpL", &rows, &channels, &reduction, &multiprocessors)) {
    return nullptr;
  }
  if (rows <= 0 || channels <= 0 || multiprocessors <= 0 ||
      channels > static_cast<long long>(INT32_MAX) * densenet_efficient::launch::kRowTileChannels) {
    PyErr_SetString(
        PyExc_ValueError,
        "row launch plan: expected positive rows and multiprocessors and 1 to (2^31 - 1)·32 channels");
    return nullptr;
  }
  const auto plan = densenet_efficient::launch::plan_rows(rows, channels, reduction != 0, multiprocessors);
  return Py_BuildValue(
      "{s:L,s:L,s:L}", "channel_tiles", static_cast<long long>(plan.channel_tiles), "row_blocks",
      static_cast<long long>(plan.row_blocks), "chunk", static_cast<long long>(plan.chunk));
}

PyMethodDef methods[] = {
    {"plan_elementwise", plan_elementwise, METH_VARARGS,
     "The CUDA elementwise kernels' launch plan for (batch, channels, plane_size, "
     "element_size, [(address, stride_n, stride_c), ...], multiprocessors)."},
    {"plan_reduction", plan_reduction, METH_VARARGS,
     "The CUDA per-channel reductions' launch plan; same arguments."},
    {"plan_rows", plan_rows, METH_VARARGS,
     "The launch plan of the CUDA kernels over channel rows for (rows, channels, reduction, "
     "multiprocessors)."},
    {nullptr, nullptr, 0, nullptr},
};

} // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
