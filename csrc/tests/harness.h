// harness.h: a minimal test harness. WKV_TEST(name) { ... } registers a test; WKV_CHECK(cond)
// and WKV_CHECK_THROWS(stmt, "substring") record failures without aborting the test.
#pragma once

#include <functional>
#include <string>
#include <vector>

namespace wkv_test {

struct Case {
  const char* name;
  std::function<void()> fn;
};
std::vector<Case>& registry();
void fail(const char* file, int line, const std::string& what);

struct Register {
  Register(const char* name, std::function<void()> fn) { registry().push_back({name, fn}); }
};

}  // namespace wkv_test

#define WKV_TEST(name)                                                  \
  static void name();                                                   \
  static ::wkv_test::Register name##_registered(#name, &name);          \
  static void name()

#define WKV_CHECK(cond)                                                        \
  do {                                                                         \
    if (!(cond)) ::wkv_test::fail(__FILE__, __LINE__, "WKV_CHECK(" #cond ")"); \
  } while (0)

#define WKV_CHECK_THROWS(stmt, substring)                                                     \
  do {                                                                                        \
    bool thrown_ = false;                                                                     \
    try {                                                                                     \
      stmt;                                                                                   \
    } catch (const std::exception& e_) {                                                      \
      thrown_ = true;                                                                         \
      if (std::string(e_.what()).find(substring) == std::string::npos)                        \
        ::wkv_test::fail(__FILE__, __LINE__,                                                  \
                         std::string("wrong message, wanted '") + substring + "': " + e_.what()); \
    }                                                                                         \
    if (!thrown_) ::wkv_test::fail(__FILE__, __LINE__, "no exception from " #stmt);          \
  } while (0)
