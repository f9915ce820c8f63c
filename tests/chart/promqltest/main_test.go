// Runs a promqltest script (load/eval, Prometheus' own test language) named by SCRIPT with
// Prometheus' PromQL engine: tests/chart/test_rules_promql.py renders the chart's alert
// expressions into scenarios and runs them through this (go test -c -o promqltest .).
package promqltest

import (
	"os"
	"testing"

	"github.com/prometheus/prometheus/promql/promqltest"
)

func TestScript(t *testing.T) {
	p := os.Getenv("SCRIPT")
	if p == "" {
		t.Skip("SCRIPT unset")
	}
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	promqltest.RunTest(t, string(b), promqltest.NewTestEngine(t, false, 0, promqltest.DefaultMaxSamplesPerQuery))
}
