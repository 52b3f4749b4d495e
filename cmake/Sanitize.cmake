# Sanitize.cmake: wkv_sanitize(<target>) adds AddressSanitizer + UndefinedBehaviorSanitizer when
# WKV_SANITIZE=ON. Every report is fatal: UBSan is built with -fno-sanitize-recover=all (abort at
# the first report) and ASan stops at the first error (halt_on_error). WKV_SANITIZE_ENV holds the
# runtime options for ctest (ENVIRONMENT property), empty without WKV_SANITIZE.
# Checks beyond -fsanitize=undefined's default set: float-cast-overflow (UB in C++: a float out of
# the target integer's range). Not checked: float-divide-by-zero (IEEE-defined; the kernels rely
# on it only where documented, e.g. NaN/inf statistics).
# The ctest binaries run as is; to load a sanitized library from Python use
# LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0.
set(WKV_SANITIZE_ENV "")
if(WKV_SANITIZE)
  set(WKV_SANITIZE_ENV
      "ASAN_OPTIONS=halt_on_error=1:detect_leaks=1:strict_string_checks=1:check_initialization_order=1"
      "UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1")
endif()

function(wkv_sanitize target)
  if(WKV_SANITIZE)
    target_compile_options(${target} PRIVATE -fsanitize=address,undefined,float-cast-overflow
                                             -fno-sanitize-recover=all -fno-omit-frame-pointer)
    target_link_options(${target} PRIVATE -fsanitize=address,undefined,float-cast-overflow)
  endif()
endfunction()
