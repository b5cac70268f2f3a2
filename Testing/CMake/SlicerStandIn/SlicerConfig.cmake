# A small stand-in for the CMake package of an installed Slicer 5.10 (find_package(Slicer) with
# -DSlicer_DIR=<this folder>). Written for this project from Slicer's documented behaviour; it implements only what
# an extension like DSDSegmentation uses, with the same rules where they decide whether the build works:
#
# - slicerMacroBuildScriptedModule(NAME SCRIPTS RESOURCES [WITH_GENERIC_TESTS] [WITH_SUBDIR]): every listed file
#   must exist at configure time (a script may also exist as <name>.py); then CTK's script copying appends ".py"
#   to every script whose extension does not match "py" and copies <source>/<path> to
#   <build>/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}/<path> (relative folders kept); resources are copied unchanged;
#   scripts are byte-compiled; install() copies that whole build folder into
#   ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR} (NO_INSTALL_SUBDIR unless WITH_SUBDIR).
# - slicer_add_python_unittest(SCRIPT ...), the extension metadata checks of the generated description file,
#   and the lib/Slicer-X.Y/qt-scripted-modules layout of the build and install trees.
set(Slicer_VERSION_MAJOR 5)
set(Slicer_VERSION_MINOR 10)
set(Slicer_VERSION "${Slicer_VERSION_MAJOR}.${Slicer_VERSION_MINOR}.0")
set(Slicer_USE_PYTHONQT ON)
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR "lib/Slicer-${Slicer_VERSION_MAJOR}.${Slicer_VERSION_MINOR}/qt-scripted-modules")
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR "${Slicer_QTSCRIPTEDMODULES_LIB_DIR}")
# Like Slicer's own SlicerConfig.cmake (it calls find_package() for each of Slicer_EXTERNAL_PROJECTS, PythonLibs and
# PythonInterp among them when Slicer_USE_PYTHONQT): in the extension's policy scope. So an extension whose
# cmake_minimum_required() range reaches 3.27 (policy CMP0148 NEW: CMake provides no FindPythonInterp /
# FindPythonLibs) fails to configure with CMake >= 3.27 against a real Slicer, and here too.
find_package(PythonLibs REQUIRED)
find_package(PythonInterp REQUIRED)
set(Slicer_USE_FILE "${CMAKE_CURRENT_LIST_DIR}/UseSlicer.cmake")
set(Slicer_EXTENSION_GENERATE_CONFIG "${CMAKE_CURRENT_LIST_DIR}/SlicerExtensionGenerateConfig.cmake")
set(Slicer_EXTENSION_CPACK "${CMAKE_CURRENT_LIST_DIR}/SlicerExtensionCPack.cmake")
set(Slicer_FOUND TRUE)
