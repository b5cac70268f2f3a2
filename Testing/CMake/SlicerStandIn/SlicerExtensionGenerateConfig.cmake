# Stand-in: Slicer generates the extension's description (s4ext) from these variables; the catalog needs them.
foreach(_var EXTENSION_HOMEPAGE EXTENSION_CONTRIBUTORS EXTENSION_DESCRIPTION EXTENSION_ICONURL EXTENSION_SCREENSHOTURLS)
  if("${${_var}}" STREQUAL "")
    message(FATAL_ERROR "stand-in: ${_var} is empty; the extension catalog needs it")
  endif()
endforeach()
get_property(_modules GLOBAL PROPERTY STANDIN_SCRIPTED_MODULES)
file(WRITE "${CMAKE_BINARY_DIR}/${PROJECT_NAME}.s4ext"
  "scm git\nhomepage ${EXTENSION_HOMEPAGE}\ncontributors ${EXTENSION_CONTRIBUTORS}\ncategory ${EXTENSION_CATEGORY}\n"
  "iconurl ${EXTENSION_ICONURL}\ndescription ${EXTENSION_DESCRIPTION}\nscreenshoturls ${EXTENSION_SCREENSHOTURLS}\n"
  "depends ${EXTENSION_DEPENDS}\nmodules ${_modules}\n")
