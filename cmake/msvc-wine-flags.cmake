# Flag overrides for cmake/msvc-wine-x86_64.cmake (CMAKE_USER_MAKE_RULES_OVERRIDE: read after CMake's
# MSVC and CUDA rules set the default flags): /Z7 instead of /Zi, so no PDB server under Wine.
foreach(_lang C CXX CUDA)
  foreach(_config DEBUG RELWITHDEBINFO)
    string(REGEX REPLACE "([-/])Zi" "\\1Z7" CMAKE_${_lang}_FLAGS_${_config}_INIT "${CMAKE_${_lang}_FLAGS_${_config}_INIT}")
  endforeach()
endforeach()
