# Locates the installed torch package without importing it and without find_package(Torch)
# (which insists on a CUDA toolkit for CUDA builds of torch and adds NEEDED entries for
# libc10/libtorch). Defines the imported target torch_stable_cpu: torch's headers, the
# TORCH_TARGET_VERSION define, and a link to torch_cpu so the loader resolves the stable-ABI C
# symbols against the copy torch has already loaded. For a CUDA build of torch it also defines
# torch_stable_cuda (the same, plus torch_cuda and USE_CUDA, which declares the CUDA shim functions)
# and TORCH_CUDA_VERSION (e.g. 13.0; empty for a CPU-only torch).

# TORCH_PACKAGE_DIR may be given (e.g. a torch for another platform, when cross-compiling);
# otherwise it is the torch installed for the Python interpreter.
set(TORCH_PACKAGE_DIR "" CACHE PATH "The installed torch package (its folder); found with Python when empty")
if(NOT TORCH_PACKAGE_DIR)
  find_package(Python REQUIRED COMPONENTS Interpreter)
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c
            "import importlib.util, os; s = importlib.util.find_spec('torch'); print(os.path.dirname(s.origin) if s else '')"
    OUTPUT_VARIABLE _torch_dir
    OUTPUT_STRIP_TRAILING_WHITESPACE)
  set(TORCH_PACKAGE_DIR "${_torch_dir}" CACHE PATH "" FORCE)
endif()
if(NOT TORCH_PACKAGE_DIR)
  message(FATAL_ERROR
    "torch is not installed for ${Python_EXECUTABLE}. Install torch>=${INPLACE_ABN_TORCH_TARGET} first "
    "and build without isolation: pip install --no-build-isolation .")
endif()

set(TORCH_VERSION_HEADER "${TORCH_PACKAGE_DIR}/include/torch/headeronly/version.h")
if(NOT EXISTS "${TORCH_VERSION_HEADER}")
  message(FATAL_ERROR "torch at ${TORCH_PACKAGE_DIR} has no stable-ABI headers: torch>=${INPLACE_ABN_TORCH_TARGET} is required")
endif()
file(STRINGS "${TORCH_VERSION_HEADER}" _major REGEX "#define TORCH_VERSION_MAJOR ")
file(STRINGS "${TORCH_VERSION_HEADER}" _minor REGEX "#define TORCH_VERSION_MINOR ")
string(REGEX REPLACE ".* ([0-9]+)$" "\\1" TORCH_VERSION_MAJOR "${_major}")
string(REGEX REPLACE ".* ([0-9]+)$" "\\1" TORCH_VERSION_MINOR "${_minor}")
set(TORCH_BUILD_VERSION "${TORCH_VERSION_MAJOR}.${TORCH_VERSION_MINOR}")
if(TORCH_BUILD_VERSION VERSION_LESS INPLACE_ABN_TORCH_TARGET)
  message(FATAL_ERROR "torch ${TORCH_BUILD_VERSION} is too old: building needs torch>=${INPLACE_ABN_TORCH_TARGET}")
endif()

# TORCH_TARGET_VERSION = (major << 56) | (minor << 48), written in hex.
string(REPLACE "." ";" _target "${INPLACE_ABN_TORCH_TARGET}")
list(GET _target 0 _tmajor)
list(GET _target 1 _tminor)
math(EXPR TORCH_TARGET_HIGH "(${_tmajor} << 24) | (${_tminor} << 16)" OUTPUT_FORMAT HEXADECIMAL)
string(REPLACE "0x" "" TORCH_TARGET_HIGH "${TORCH_TARGET_HIGH}")
string(LENGTH "${TORCH_TARGET_HIGH}" _len)
while(_len LESS 8)
  string(PREPEND TORCH_TARGET_HIGH "0")
  string(LENGTH "${TORCH_TARGET_HIGH}" _len)
endwhile()
set(TORCH_TARGET_VERSION "0x${TORCH_TARGET_HIGH}00000000ULL")

# TORCH_CPU_LIBRARY may be given too (e.g. an import library made for a cross-compiler).
find_library(TORCH_CPU_LIBRARY NAMES torch_cpu PATHS "${TORCH_PACKAGE_DIR}/lib" NO_DEFAULT_PATH REQUIRED)

add_library(torch_stable_cpu INTERFACE IMPORTED)
target_include_directories(torch_stable_cpu INTERFACE "${TORCH_PACKAGE_DIR}/include")
target_compile_definitions(torch_stable_cpu INTERFACE TORCH_TARGET_VERSION=${TORCH_TARGET_VERSION})
target_link_libraries(torch_stable_cpu INTERFACE "${TORCH_CPU_LIBRARY}")
message(STATUS "torch ${TORCH_BUILD_VERSION} at ${TORCH_PACKAGE_DIR}; binaries target torch>=${INPLACE_ABN_TORCH_TARGET} (${TORCH_TARGET_VERSION})")

# A CUDA build of torch has torch_cuda next to torch_cpu and names its CUDA version in version.py.
set(TORCH_CUDA_VERSION "")
if(EXISTS "${TORCH_PACKAGE_DIR}/version.py")
  file(STRINGS "${TORCH_PACKAGE_DIR}/version.py" _cuda REGEX "^cuda[^=]*= *'[0-9.]+'")
  string(REGEX REPLACE ".*'([0-9.]+)'.*" "\\1" TORCH_CUDA_VERSION "${_cuda}")
endif()
find_library(TORCH_CUDA_LIBRARY NAMES torch_cuda PATHS "${TORCH_PACKAGE_DIR}/lib" NO_DEFAULT_PATH)
if(TORCH_CUDA_LIBRARY)
  add_library(torch_stable_cuda INTERFACE IMPORTED)
  target_link_libraries(torch_stable_cuda INTERFACE torch_stable_cpu "${TORCH_CUDA_LIBRARY}")
  target_compile_definitions(torch_stable_cuda INTERFACE USE_CUDA)
endif()
