; Programs that pass every packet: bench_gateway's --control rounds, which
; separate what a hook on a veth costs from what the sensor's programs cost.
; Pointer-free IR, so LLVM 14 and 22 both compile it:
;   llc -march=bpf -filetype=obj -o pass.o pass.ll
target triple = "bpf"

define i32 @xdp_pass(i64 %ctx) section "xdp" {
  ret i32 2 ; XDP_PASS
}

define i32 @tc_pass(i64 %ctx) section "tc" {
  ret i32 0 ; TC_ACT_OK
}

@_license = global [4 x i8] c"GPL\00", section "license", align 1
