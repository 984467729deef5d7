# CUDA libraries built elsewhere, installed beside this build's libraries: how one wheel carries a
# CUDA library per CUDA major although one build has one nvcc. The release workflow builds the CUDA 12
# library in one job and passes its output to the CUDA 13 build:
#
#   -DINPLACE_ABN_PREBUILT_CUDA="dir1;dir2"  folders that hold inplace_abn_cuda<major>.{so,dll} and the
#                                            build_info.json of their build (another build's installed
#                                            inplace_abn/ folder, or an unpacked wheel's); relative paths
#                                            are relative to the source tree
#
# Each library's build_info.json entry is merged into this build's; a major this build already has,
# another platform or another torch target fail the configure step. Appends to
# BUILD_INFO_CUDA_LIBRARIES and CUDA_LIBRARY_MAJORS.

set(INPLACE_ABN_PREBUILT_CUDA "" CACHE STRING
    "Folders with prebuilt CUDA libraries (inplace_abn_cuda<major> + build_info.json) to install too")

foreach(_dir IN LISTS INPLACE_ABN_PREBUILT_CUDA)
  get_filename_component(_dir "${_dir}" ABSOLUTE BASE_DIR "${CMAKE_CURRENT_SOURCE_DIR}")
  if(NOT EXISTS "${_dir}/build_info.json")
    message(FATAL_ERROR "INPLACE_ABN_PREBUILT_CUDA: ${_dir} has no build_info.json (give the inplace_abn/ folder "
                        "of a build or an unpacked wheel)")
  endif()
  file(READ "${_dir}/build_info.json" _json)
  string(JSON _system ERROR_VARIABLE _error GET "${_json}" system)
  string(JSON _target ERROR_VARIABLE _error GET "${_json}" torch_target)
  if(NOT _system STREQUAL "${CMAKE_SYSTEM_NAME}-${CMAKE_SYSTEM_PROCESSOR}")
    message(FATAL_ERROR "INPLACE_ABN_PREBUILT_CUDA: ${_dir} was built for ${_system}, this build is for "
                        "${CMAKE_SYSTEM_NAME}-${CMAKE_SYSTEM_PROCESSOR}")
  endif()
  if(NOT _target STREQUAL INPLACE_ABN_TORCH_TARGET)
    message(FATAL_ERROR "INPLACE_ABN_PREBUILT_CUDA: ${_dir} targets torch ${_target}, this build torch "
                        "${INPLACE_ABN_TORCH_TARGET}")
  endif()
  string(JSON _libraries ERROR_VARIABLE _error GET "${_json}" cuda_libraries)
  set(_count 0)
  if(NOT _error)
    string(JSON _count LENGTH "${_libraries}")
  endif()
  if(_count EQUAL 0)
    message(FATAL_ERROR "INPLACE_ABN_PREBUILT_CUDA: ${_dir}/build_info.json lists no CUDA library")
  endif()
  math(EXPR _last "${_count} - 1")
  foreach(_index RANGE ${_last})
    string(JSON _major MEMBER "${_libraries}" ${_index})
    string(JSON _entry GET "${_libraries}" "${_major}")
    set(_file "${_dir}/inplace_abn_cuda${_major}${CMAKE_SHARED_MODULE_SUFFIX}")
    if(_major IN_LIST CUDA_LIBRARY_MAJORS)
      message(FATAL_ERROR "INPLACE_ABN_PREBUILT_CUDA: a CUDA ${_major} library is already part of this build "
                          "(${_file})")
    endif()
    if(NOT EXISTS "${_file}")
      message(FATAL_ERROR "INPLACE_ABN_PREBUILT_CUDA: ${_file} is missing (listed in ${_dir}/build_info.json)")
    endif()
    install(FILES "${_file}" DESTINATION inplace_abn)
    list(APPEND BUILD_INFO_CUDA_LIBRARIES "\"${_major}\": ${_entry}")
    list(APPEND CUDA_LIBRARY_MAJORS ${_major})
    message(STATUS "CUDA library inplace_abn_cuda${_major}: prebuilt, from ${_dir}")
  endforeach()
endforeach()
