# Fails when an object file compiled for one CPU instruction set defines a shared (weak / COMDAT)
# function outside the namespace of that instruction set. Such a function would be merged by the
# linker with its twin from another instruction-set build, so code built for the portable baseline
# could end up running AVX2 instructions. Usage:
#   cmake -DNM=nm -DISA=avx2 -DOBJECTS=a.o;b.o -P CheckIsaSymbols.cmake
foreach(object IN LISTS OBJECTS)
  execute_process(COMMAND ${NM} -C --defined-only ${object} OUTPUT_VARIABLE symbols RESULT_VARIABLE failed)
  if(failed)
    message(FATAL_ERROR "${NM} failed on ${object}")
  endif()
  string(REPLACE "\n" ";" lines "${symbols}")
  set(shared "")
  foreach(line IN LISTS lines)
    # "<address> <type> <name>": W/V weak, u unique global, i indirect
    if(line MATCHES "^[0-9a-fA-F]* [WVui] (.*)$")
      set(name "${CMAKE_MATCH_1}")
      if(NOT name MATCHES "::${ISA}::" AND NOT name MATCHES "^(DW\\.ref\\.|typeinfo|vtable|guard variable)")
        string(APPEND shared "\n  ${name}")
      endif()
    endif()
  endforeach()
  if(shared)
    message(FATAL_ERROR "${object} (instruction set ${ISA}) defines shared functions outside namespace ${ISA}:${shared}")
  endif()
endforeach()
