# Sanitize.cmake: wkv_sanitize(<target>) adds AddressSanitizer + UBSan when WKV_SANITIZE=ON.
# The ctest binaries run as is; to load a sanitized library from Python use
# LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0.
function(wkv_sanitize target)
  if(WKV_SANITIZE)
    target_compile_options(${target} PRIVATE -fsanitize=address,undefined -fno-omit-frame-pointer
                                             -fno-sanitize-recover=undefined)
    target_link_options(${target} PRIVATE -fsanitize=address,undefined)
  endif()
endfunction()
