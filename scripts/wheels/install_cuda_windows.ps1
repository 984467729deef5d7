# Installs the CUDA compiler, runtime, CCCL headers and cuobjdump of one CUDA major on a Windows runner
# with NVIDIA's network installer (components only, no driver) and exports CUDA_PATH / CUDACXX / PATH
# to the next workflow steps. The "thrust" component is CCCL (thrust, cub, libcu++): cuda_fp16.h and
# cuda_bf16.h include <nv/target> from it. Usage: install_cuda_windows.ps1 -Major 12|13
param([Parameter(Mandatory = $true)][ValidateSet("12", "13")][string]$Major)
$ErrorActionPreference = "Stop"
$version = @{ "12" = "12.9.1"; "13" = "13.0.2" }[$Major]
$short = ($version -split "\.")[0..1] -join "."
$installer = "$env:RUNNER_TEMP\cuda_$version.exe"
$url = "https://developer.download.nvidia.com/compute/cuda/$version/network_installers/cuda_${version}_windows_network.exe"
Write-Host "downloading $url"
Invoke-WebRequest -Uri $url -OutFile $installer
$components = @("nvcc", "cudart", "cuobjdump", "thrust", "visual_studio_integration") | ForEach-Object { "${_}_$short" }
if ($Major -eq "13") { $components += @("crt_$short", "nvvm_$short", "nvptxcompiler_$short") }
$process = Start-Process -FilePath $installer -ArgumentList (@("-s") + $components) -Wait -PassThru
if ($process.ExitCode -ne 0) { throw "CUDA installer failed with exit code $($process.ExitCode)" }
$root = "C:\Program Files\NVIDIA GPU Computing Toolkit\CUDA\v$short"
& "$root\bin\nvcc.exe" --version
if ($LASTEXITCODE -ne 0) { throw "nvcc does not run" }
if (-not (Test-Path "$root\include\nv\target")) { throw "CCCL headers missing: $root\include\nv\target" }
"CUDA_PATH=$root" | Out-File -FilePath $env:GITHUB_ENV -Append -Encoding utf8
"CUDACXX=$root\bin\nvcc.exe" | Out-File -FilePath $env:GITHUB_ENV -Append -Encoding utf8
"$root\bin" | Out-File -FilePath $env:GITHUB_PATH -Append -Encoding utf8
