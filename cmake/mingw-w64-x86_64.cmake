# CMake toolchain file: cross-compile the native libraries for 64-bit Windows with mingw-w64 (GCC),
# on Linux. Used by scripts/windows/wine_job.sh to test the CPU library on real Windows binaries
# under Wine; the published Windows wheels are built with MSVC.
#
#   cmake -DCMAKE_TOOLCHAIN_FILE=cmake/mingw-w64-x86_64.cmake \
#         -DTORCH_PACKAGE_DIR=<a Windows torch package folder> \
#         -DTORCH_CPU_LIBRARY=<import library for torch_cpu.dll> ...
#
# Debian: apt-get install gcc-mingw-w64-x86-64-win32 g++-mingw-w64-x86-64-win32 (the "win32" thread
# model: no dependency on libwinpthread-1.dll).
set(CMAKE_SYSTEM_NAME Windows)
set(CMAKE_SYSTEM_PROCESSOR AMD64)  # what CMake reports on 64-bit Windows, so build_info.json matches an MSVC build

set(MINGW_TRIPLET x86_64-w64-mingw32 CACHE STRING "mingw-w64 target triplet (compiler prefix)")
# Debian's alternatives point the plain names at the posix or the win32 thread model; use the win32
# one explicitly where it is installed.
foreach(_lang_tool C:gcc CXX:g++)
  string(REPLACE ":" ";" _pair "${_lang_tool}")
  list(GET _pair 0 _lang)
  list(GET _pair 1 _tool)
  find_program(_compiler_${_lang} NAMES ${MINGW_TRIPLET}-${_tool}-win32 ${MINGW_TRIPLET}-${_tool} REQUIRED)
  set(CMAKE_${_lang}_COMPILER "${_compiler_${_lang}}")
endforeach()
set(CMAKE_RC_COMPILER ${MINGW_TRIPLET}-windres)
set(CMAKE_NM ${MINGW_TRIPLET}-nm CACHE FILEPATH "")

set(CMAKE_FIND_ROOT_PATH /usr/${MINGW_TRIPLET})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)

# The GCC runtime is linked statically: the DLL then depends only on torch_cpu.dll and on DLLs that
# every Windows has (KERNEL32, msvcrt), like the MSVC build, and never meets another package's
# libstdc++-6.dll / libgcc_s_seh-1.dll of another version in the same process.
set(CMAKE_SHARED_LINKER_FLAGS_INIT "-static-libgcc -static-libstdc++ -Wl,--no-undefined")
set(CMAKE_MODULE_LINKER_FLAGS_INIT "-static-libgcc -static-libstdc++ -Wl,--no-undefined")
