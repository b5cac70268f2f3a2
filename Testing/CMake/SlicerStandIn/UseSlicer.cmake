# Stand-in for UseSlicer.cmake: the macros an extension calls.
find_package(Python3 COMPONENTS Interpreter REQUIRED)

function(_standin_copy_rule target src dst what)
  add_custom_command(OUTPUT "${dst}"
    COMMAND "${CMAKE_COMMAND}" -E copy "${src}" "${dst}"
    DEPENDS "${src}"
    COMMENT "stand-in: copying python ${what} ${dst}")
  set_property(GLOBAL APPEND PROPERTY "STANDIN_${target}_OUTPUTS" "${dst}")
endfunction()

macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(_SM "WITH_GENERIC_TESTS;WITH_SUBDIR;VERBOSE" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  if(_SM_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "Unknown keywords given to slicerMacroBuildScriptedModule(): \"${_SM_UNPARSED_ARGUMENTS}\"")
  endif()
  if(NOT _SM_NAME)
    message(FATAL_ERROR "NAME is mandatory")
  endif()
  # configure time: each listed file exists (for a script, <name>.py also counts)
  foreach(_kind SCRIPTS RESOURCES)
    foreach(_f ${_SM_${_kind}})
      if(IS_ABSOLUTE "${_f}")
        set(_abs "${_f}")
      else()
        set(_abs "${CMAKE_CURRENT_SOURCE_DIR}/${_f}")
      endif()
      if(NOT EXISTS "${_abs}" AND NOT EXISTS "${_abs}.py")
        message(FATAL_ERROR "slicerMacroBuildScriptedModule(${_kind}) given nonexistent file or directory '${_f}'")
      endif()
    endforeach()
  endforeach()
  set(_dest "${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}")
  if(_SM_WITH_SUBDIR)
    get_filename_component(_sub "${CMAKE_CURRENT_SOURCE_DIR}" NAME)
    set(_dest "${_dest}/${_sub}")
  endif()
  set(_copied_scripts)
  foreach(_f ${_SM_SCRIPTS})
    # CTK's rule: a script whose extension does not match "py" gets ".py" appended before it is copied
    get_filename_component(_ext "${_f}" EXT)
    if(NOT "${_ext}" MATCHES "py")
      set(_f "${_f}.py")
    endif()
    if(IS_ABSOLUTE "${_f}")
      set(_src "${_f}")
      file(RELATIVE_PATH _rel "${CMAKE_CURRENT_BINARY_DIR}" "${_f}")
    else()
      set(_src "${CMAKE_CURRENT_SOURCE_DIR}/${_f}")
      set(_rel "${_f}")
    endif()
    _standin_copy_rule(${_SM_NAME} "${_src}" "${_dest}/${_rel}" script)
    list(APPEND _copied_scripts "${_dest}/${_rel}")
  endforeach()
  foreach(_f ${_SM_RESOURCES})
    if(IS_ABSOLUTE "${_f}")
      set(_src "${_f}")
    else()
      set(_src "${CMAKE_CURRENT_SOURCE_DIR}/${_f}")
    endif()
    _standin_copy_rule(${_SM_NAME} "${_src}" "${_dest}/${_f}" resource)
  endforeach()
  get_property(_outputs GLOBAL PROPERTY "STANDIN_${_SM_NAME}_OUTPUTS")
  add_custom_target(Copy${_SM_NAME}PythonFiles ALL DEPENDS ${_outputs})
  # byte-compile the copied scripts (a syntax error fails the build, as it would show in Slicer) with the
  # interpreter found through PythonInterp, each to <script>.pyc beside it, as CTK's compile step does
  file(WRITE "${CMAKE_CURRENT_BINARY_DIR}/standin_compile.py"
    "import py_compile, sys\nfor f in sys.argv[1:]:\n    py_compile.compile(f, cfile=f + 'c', doraise=True)\n")
  add_custom_command(OUTPUT "${CMAKE_CURRENT_BINARY_DIR}/${_SM_NAME}_compiled"
    COMMAND "${PYTHON_EXECUTABLE}" "${CMAKE_CURRENT_BINARY_DIR}/standin_compile.py" ${_copied_scripts}
    COMMAND "${CMAKE_COMMAND}" -E touch "${CMAKE_CURRENT_BINARY_DIR}/${_SM_NAME}_compiled"
    DEPENDS Copy${_SM_NAME}PythonFiles ${_copied_scripts}
    COMMENT "stand-in: compiling python scripts of ${_SM_NAME}")
  add_custom_target(Compile${_SM_NAME}PythonFiles ALL DEPENDS "${CMAKE_CURRENT_BINARY_DIR}/${_SM_NAME}_compiled")
  # install: the whole build folder of scripted modules, without a target subfolder
  install(DIRECTORY "${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}/"
    DESTINATION "${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}" COMPONENT RuntimeLibraries USE_SOURCE_PERMISSIONS)
  set_property(GLOBAL APPEND PROPERTY STANDIN_SCRIPTED_MODULES "${_SM_NAME}")
endmacro()

function(slicer_add_python_unittest)
  cmake_parse_arguments(_UT "" "SCRIPT;TESTNAME_PREFIX" "SLICER_ARGS" ${ARGN})
  if(NOT EXISTS "${CMAKE_CURRENT_SOURCE_DIR}/${_UT_SCRIPT}")
    message(FATAL_ERROR "slicer_add_python_unittest: ${_UT_SCRIPT} does not exist")
  endif()
  set_property(GLOBAL APPEND PROPERTY STANDIN_UNITTESTS "${_UT_SCRIPT}")
endfunction()
