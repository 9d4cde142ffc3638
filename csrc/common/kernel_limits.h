// The limits of dat's fused kernels, declared once per kernel: the kernel checks them before it allocates
// anything, and exports the same values as JSON through the op `<op>_<device>_limits() -> str`. The op's
// Python side (dat/ops/<op>.py) reads that JSON at import, so that `auto` takes the reference wherever the
// kernel would refuse the call, and `fused` raises the kernel's own message before calling it.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cctype>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace dat {

// The largest count that fits the int32 a kernel indexes with, or a launch's grid.x.
constexpr int64_t kMaxInt32 = std::numeric_limits<int32_t>::max();

// torch's Python name of a dtype (float32, bfloat16, float8_e4m3fn), so that the kernels' messages read
// exactly as the Python side's.
inline std::string dtype_name(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return "float32";
    case at::kDouble:
      return "float64";
    case at::kHalf:
      return "float16";
    default: {  // BFloat16, Float8_e4m3fn, ...: c10's name, lower-cased, is torch's
      std::string name = c10::toString(dtype);
      for (char& character : name) character = static_cast<char>(std::tolower(static_cast<unsigned char>(character)));
      return name;
    }
  }
}

// Raises TypeError unless `dtype` is one of the kernel's `supported` dtypes; `device` names the kernel ("CPU").
inline void check_kernel_dtype(at::ScalarType dtype, c10::ArrayRef<at::ScalarType> supported, const char* op_name,
                               const char* device) {
  for (const at::ScalarType candidate : supported) {
    if (candidate == dtype) return;
  }
  std::string names;
  for (const at::ScalarType candidate : supported) names += (names.empty() ? "" : ", ") + dtype_name(candidate);
  TORCH_CHECK_TYPE(false, op_name, ": the ", device, " kernel supports ", names, "; got ", dtype_name(dtype));
}

// Raises ValueError unless `blocks`, the grid.x of one launch, fits a CUDA grid; `what` says what they cover.
inline void check_grid_blocks(int64_t blocks, const char* op_name, int64_t items, const char* what) {
  TORCH_CHECK_VALUE(blocks <= kMaxInt32, op_name, ": ", items, " ", what, " are more than one CUDA launch can cover");
}

// The JSON object a kernel's limits op returns: counts, dtype lists and nested objects of them.
class LimitsJson {
 public:
  LimitsJson& number(const char* key, int64_t value) { return member(key, std::to_string(value)); }

  LimitsJson& dtypes(const char* key, c10::ArrayRef<at::ScalarType> values) {
    std::string list;
    for (const at::ScalarType dtype : values) list += (list.empty() ? "\"" : ", \"") + dtype_name(dtype) + "\"";
    return member(key, "[" + list + "]");
  }

  LimitsJson& object(const char* key, const LimitsJson& value) { return member(key, value.str()); }

  std::string str() const {
    std::string joined;
    for (const std::string& entry : members_) joined += (joined.empty() ? "" : ", ") + entry;
    return "{" + joined + "}";
  }

 private:
  LimitsJson& member(const char* key, const std::string& value) {
    members_.push_back("\"" + std::string(key) + "\": " + value);
    return *this;
  }

  std::vector<std::string> members_;
};

}  // namespace dat
