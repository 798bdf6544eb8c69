"""Runs CPython regression-test modules (named as arguments) inside the container and prints one line per
test: `RESULT <outcome> <test id>`, outcome one of ok, fail, error, skip, xfail, xpass; then
`MODULE <name> <seconds>` per module. Run by tests/cli/test_real_software.py under runc and under pykata.
A name `module:Part1,Part2` runs only the module's tests whose id has a component starting with a part
(test_io:CIOTest,CMiscIOTest), after the module's own load_tests (test_io's classes need it)."""

import sys
import time
import unittest


class Lines(unittest.TestResult):
    def _out(self, outcome, test):
        sys.__stdout__.write(f"RESULT {outcome} {test.id()}\n")
        sys.__stdout__.flush()

    def addSuccess(self, test):
        super().addSuccess(test)
        self._out("ok", test)

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._out("fail", test)
        sys.__stderr__.write(f"== FAIL {test.id()}\n{self._exc_info_to_string(err, test)}\n")

    def addError(self, test, err):
        super().addError(test, err)
        self._out("error", test)
        sys.__stderr__.write(f"== ERROR {test.id()}\n{self._exc_info_to_string(err, test)}\n")

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        self._out("skip", test)

    def addExpectedFailure(self, test, err):
        super().addExpectedFailure(test, err)
        self._out("xfail", test)

    def addUnexpectedSuccess(self, test):
        super().addUnexpectedSuccess(test)
        self._out("xpass", test)

    def addSubTest(self, test, subtest, err):
        super().addSubTest(test, subtest, err)
        if err is not None:
            self._out("fail", subtest)
            sys.__stderr__.write(f"== SUBTEST {subtest.id()}\n{self._exc_info_to_string(err, subtest)}\n")


def tests_of(suite, parts):
    for t in suite:
        if isinstance(t, unittest.TestSuite):
            yield from tests_of(t, parts)
        elif any(c.startswith(p) for c in t.id().split(".") for p in parts):
            yield t


for name in sys.argv[1:]:
    start = time.monotonic()
    module, _, only = name.partition(":")
    suite = unittest.defaultTestLoader.loadTestsFromName(f"test.{module}")
    if only:
        suite = unittest.TestSuite(tests_of(suite, only.split(",")))
    suite.run(Lines())
    sys.__stdout__.write(f"MODULE {name} {time.monotonic() - start:.2f}\n")
