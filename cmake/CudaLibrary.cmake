# The CUDA library inplace_abn_cuda<major> (src/cuda), named by the CUDA major of the nvcc that builds
# it (inplace_abn_cuda12, inplace_abn_cuda13): the operators' CUDA kernels, linking torch_cuda and a
# static CUDA runtime (the wheel then needs no CUDA runtime beside torch's). Built by default when a
# CUDA compiler is found and torch is a CUDA build. Appends its entry to BUILD_INFO_CUDA_LIBRARIES
# (build_info.json) and its major to CUDA_LIBRARY_MAJORS.
#
#   -DINPLACE_ABN_CUDA=ON|OFF            force it on (fails without a CUDA compiler or CUDA torch) or off
#   -DINPLACE_ABN_CUDA_ARCHS="75;80;..." real architectures; PTX is added for the newest one. Those the
#                                        toolkit cannot build are dropped with a message (e.g. 100 and
#                                        120 need CUDA 12.8; CUDA 13 dropped everything below 75).

include(CheckLanguage)
check_language(CUDA)
set(_cuda_default OFF)
if(CMAKE_CUDA_COMPILER AND TARGET torch_stable_cuda)
  set(_cuda_default ON)
endif()
option(INPLACE_ABN_CUDA "Build the CUDA library inplace_abn_cuda<major>" ${_cuda_default})
set(INPLACE_ABN_CUDA_ARCHS "75;80;86;89;90;100;120" CACHE STRING
    "GPU architectures (compute capability x10) to build real code for; PTX is added for the newest")

if(NOT INPLACE_ABN_CUDA)
  if(CMAKE_CUDA_COMPILER AND NOT TARGET torch_stable_cuda)
    message(STATUS "CUDA library: off (torch at ${TORCH_PACKAGE_DIR} is not a CUDA build)")
  elseif(NOT CMAKE_CUDA_COMPILER)
    message(STATUS "CUDA library: off (no CUDA compiler found)")
  endif()
  return()
endif()
if(NOT CMAKE_CUDA_COMPILER)
  message(FATAL_ERROR "INPLACE_ABN_CUDA=ON but no CUDA compiler was found (put nvcc on PATH or set CUDACXX)")
endif()
if(NOT TARGET torch_stable_cuda)
  message(FATAL_ERROR "INPLACE_ABN_CUDA=ON but torch at ${TORCH_PACKAGE_DIR} is not a CUDA build (no torch_cuda)")
endif()

enable_language(CUDA)
find_package(CUDAToolkit REQUIRED)
string(REGEX MATCH "^[0-9]+\\.[0-9]+" CUDA_VERSION_SHORT "${CMAKE_CUDA_COMPILER_VERSION}")
string(REGEX MATCH "^[0-9]+" _cuda_major "${CUDA_VERSION_SHORT}")
string(REGEX MATCH "^[0-9]+" _torch_cuda_major "${TORCH_CUDA_VERSION}")
if(_torch_cuda_major AND NOT _cuda_major STREQUAL _torch_cuda_major)
  message(WARNING "CUDA ${CUDA_VERSION_SHORT} builds the CUDA library but torch is built with CUDA "
                  "${TORCH_CUDA_VERSION}: the library will only load under a torch built with CUDA ${_cuda_major}.x")
endif()

# Oldest toolkit that compiles each architecture; CUDA 13 removed those below 75.
set(_min_cuda_75 10.0)
set(_min_cuda_80 11.0)
set(_min_cuda_86 11.1)
set(_min_cuda_87 11.4)
set(_min_cuda_89 11.8)
set(_min_cuda_90 11.8)
set(_min_cuda_100 12.8)
set(_min_cuda_101 12.8)
set(_min_cuda_103 12.9)
set(_min_cuda_110 13.0)
set(_min_cuda_120 12.8)
set(_min_cuda_121 12.9)
set(CUDA_REAL_ARCHS "")
foreach(arch IN LISTS INPLACE_ABN_CUDA_ARCHS)
  if(NOT arch MATCHES "^[0-9]+$")
    message(FATAL_ERROR "INPLACE_ABN_CUDA_ARCHS: '${arch}' is not a compute capability like 90")
  elseif(DEFINED _min_cuda_${arch} AND CUDA_VERSION_SHORT VERSION_LESS _min_cuda_${arch})
    message(STATUS "CUDA library: sm_${arch} dropped (needs CUDA ${_min_cuda_${arch}}, this is ${CUDA_VERSION_SHORT})")
  elseif(arch LESS 75 AND CUDA_VERSION_SHORT VERSION_GREATER_EQUAL 13.0)
    message(STATUS "CUDA library: sm_${arch} dropped (CUDA 13 no longer builds it)")
  else()
    list(APPEND CUDA_REAL_ARCHS ${arch})
  endif()
endforeach()
list(REMOVE_DUPLICATES CUDA_REAL_ARCHS)
list(SORT CUDA_REAL_ARCHS COMPARE NATURAL)
if(NOT CUDA_REAL_ARCHS)
  message(FATAL_ERROR
          "INPLACE_ABN_CUDA_ARCHS (${INPLACE_ABN_CUDA_ARCHS}): no architecture CUDA ${CUDA_VERSION_SHORT} can build")
endif()
list(GET CUDA_REAL_ARCHS -1 CUDA_PTX_ARCH)
list(TRANSFORM CUDA_REAL_ARCHS APPEND "-real" OUTPUT_VARIABLE _cuda_architectures)
list(APPEND _cuda_architectures "${CUDA_PTX_ARCH}-virtual")

add_library(inplace_abn_cuda MODULE src/cuda/ops_cuda.cpp src/cuda/forward.cu src/cuda/backward.cu)
set_target_properties(inplace_abn_cuda PROPERTIES
  PREFIX ""
  OUTPUT_NAME "inplace_abn_cuda${_cuda_major}"
  CUDA_ARCHITECTURES "${_cuda_architectures}"
  CUDA_STANDARD 17
  CUDA_STANDARD_REQUIRED ON
  CUDA_VISIBILITY_PRESET hidden
  CUDA_RUNTIME_LIBRARY None  # linked below, statically
  INSTALL_RPATH "$ORIGIN/../torch/lib")
if(MSVC)
  set(_cuda_host_warnings -Xcompiler=/W4)
else()
  set(_cuda_host_warnings -Xcompiler=-Wall,-Wextra)
endif()
target_compile_options(inplace_abn_cuda PRIVATE
  $<$<COMPILE_LANGUAGE:CXX>:${WARNING_FLAGS}>
  # constexpr host functions (std::numeric_limits) in device code
  $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr ${_cuda_host_warnings}>)
target_link_libraries(inplace_abn_cuda PRIVATE torch_stable_cuda CUDA::cudart_static)
if(CMAKE_SYSTEM_NAME STREQUAL "Linux")
  # A missing symbol fails the build, not the import; the static runtime's symbols stay private, so
  # they never bind to (or are bound by) the CUDA runtime that torch loads.
  target_link_options(inplace_abn_cuda PRIVATE -Wl,--no-undefined -Wl,--exclude-libs,ALL)
endif()
install(TARGETS inplace_abn_cuda LIBRARY DESTINATION inplace_abn RUNTIME DESTINATION inplace_abn)

list(TRANSFORM CUDA_REAL_ARCHS REPLACE "(.+)" "\"\\1\"" OUTPUT_VARIABLE _archs_json)
list(JOIN _archs_json ", " _archs_json)
string(CONCAT _entry "\"${_cuda_major}\": {\"version\": \"${CUDA_VERSION_SHORT}\", \"torch_cuda\": \"${TORCH_CUDA_VERSION}\", "
                     "\"architectures\": [${_archs_json}], \"ptx\": \"${CUDA_PTX_ARCH}\"}")
list(APPEND BUILD_INFO_CUDA_LIBRARIES "${_entry}")
list(APPEND CUDA_LIBRARY_MAJORS ${_cuda_major})
list(JOIN CUDA_REAL_ARCHS ", " _archs)
message(STATUS "CUDA library inplace_abn_cuda${_cuda_major}: CUDA ${CUDA_VERSION_SHORT}, real code for ${_archs}, "
               "PTX for ${CUDA_PTX_ARCH}")
